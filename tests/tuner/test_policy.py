"""Job paths confined to the tuner's roots: links followed, `..` collapsed, the same refusal for an outside
path that exists and one that does not; publish servers by configured name only."""

from __future__ import annotations

from pathlib import Path

import pytest

from effllm.tuner.config import ConfigError, TuneConfig
from effllm.tuner.policy import PathRefused, TunerPolicy, confine


@pytest.fixture()
def policy(tmp_path: Path) -> TunerPolicy:
    for name in ("data", "out", "adapters"):
        (tmp_path / name).mkdir()
    return TunerPolicy.create(
        tmp_path / "data", tmp_path / "out", tmp_path / "adapters", ("prod=127.0.0.1:50051",)
    )


def test_inside_paths_resolve_to_absolute_ones(policy: TunerPolicy) -> None:
    (policy.data_root / "sub").mkdir()
    assert confine("data", "sub/../train.jsonl", policy.data_root) == policy.data_root / "train.jsonl"
    assert (
        confine("data", str(policy.data_root / "a.jsonl"), policy.data_root) == policy.data_root / "a.jsonl"
    )
    config = policy.confine_job(TuneConfig(data="train.jsonl", output_dir="run1"))
    assert config.data == str(policy.data_root / "train.jsonl")
    assert config.output_dir == str(policy.output_root / "run1")
    assert policy.confine_job(TuneConfig(data="task:json_extract")).data == "task:json_extract"


@pytest.mark.parametrize(
    "outside", ["/etc/shadow", "/nonexistent/x", "../escape", "/", "~/x/../../../../etc"]
)
def test_outside_paths_get_one_message_whether_or_not_they_exist(policy: TunerPolicy, outside: str) -> None:
    messages = set()
    for field in ("data", "eval_data", "model", "output_dir"):
        with pytest.raises(PathRefused) as err:
            policy.confine_job(TuneConfig(**{field: outside}))
        assert str(err.value).startswith(f"{field}: must be a path inside the tuner's --")
        assert outside not in str(err.value)  # nothing about the path comes back
        messages.add(str(err.value).split(":")[0])
    assert len(messages) == 4


def test_existing_and_missing_outside_paths_are_indistinguishable(policy: TunerPolicy) -> None:
    answers = set()
    for outside in ("/etc/passwd", "/etc/shadow", "/nonexistent", "/nonexistent/deeper/x.jsonl"):
        with pytest.raises(PathRefused) as err:
            confine("data", outside, policy.data_root)
        answers.add(str(err.value))
    assert len(answers) == 1


def test_links_out_of_a_root_are_followed_and_refused(policy: TunerPolicy, tmp_path: Path) -> None:
    outside = tmp_path / "secret.jsonl"
    outside.write_text('{"text": "secret"}\n')
    (policy.data_root / "link.jsonl").symlink_to(outside)
    (policy.output_root / "linkdir").symlink_to(tmp_path)
    (policy.data_root / "loop").symlink_to(policy.data_root / "loop")
    with pytest.raises(PathRefused, match=r"^data: "):
        confine("data", "link.jsonl", policy.data_root)
    with pytest.raises(PathRefused, match=r"^output_dir: "):
        confine("output_dir", "linkdir/new", policy.output_root)
    with pytest.raises(PathRefused, match=r"^data: "):
        confine("data", "loop/x", policy.data_root)


@pytest.mark.parametrize("bad", ["a\x00b", "x" * 5000, "line\nbreak", ""])
def test_unusable_strings_are_refused_naming_the_field(policy: TunerPolicy, bad: str) -> None:
    with pytest.raises(PathRefused, match=r"^data: "):
        confine("data", bad, policy.data_root)


def test_publish_names_a_configured_server_and_an_adapter_root_inside(policy: TunerPolicy) -> None:
    assert policy.server("prod").address == "127.0.0.1:50051"
    with pytest.raises(ConfigError, match=r"^publish.server: .*not a server this tuner publishes to"):
        policy.server("127.0.0.1:50051")
    assert policy.confine_adapter_root("") == policy.adapter_root
    assert policy.confine_adapter_root("team") == policy.adapter_root / "team"  # type: ignore[operator]
    with pytest.raises(PathRefused, match=r"^publish.adapter_root: "):
        policy.confine_adapter_root("/tmp")
    no_publish = TunerPolicy.create(policy.data_root, policy.output_root)
    with pytest.raises(PathRefused, match="publishing is off"):
        no_publish.confine_adapter_root("")


@pytest.mark.parametrize("spec", ["prod", "prod=host", "=h:1", "a b=h:1", "p=h:x"])
def test_bad_publish_server_flags_are_refused(tmp_path: Path, spec: str) -> None:
    with pytest.raises(ValueError, match="--publish-server"):
        TunerPolicy.create(tmp_path, tmp_path, tmp_path, (spec,))


PATH_LIKE_HF = ["hf:/etc", "hf:/nonexistent/dir", "hf:../../..", "hf:../../nonexistent", "hf:./x", "hf:~/x"]
PATH_LIKE_HF += ["hf:a/b/c", "hf:a\\b", "hf:.hidden", "hf:C:/x", "hf:a/..", "hf:" + "x" * 97, "hf:"]


@pytest.mark.parametrize("field", ["data", "eval_data"])
def test_hf_takes_hub_ids_never_paths_with_one_message(field: str, tmp_path: Path) -> None:
    (tmp_path / "exists").mkdir()
    answers = set()
    for value in [*PATH_LIKE_HF, f"hf:{tmp_path}/exists", f"hf:{tmp_path}/missing"]:
        with pytest.raises(ConfigError) as err:
            TuneConfig(**{field: value})
        assert str(err.value).startswith(f"{field}: hf: takes a hub dataset id"), value
        answers.add(str(err.value))
    assert len(answers) == 1  # nothing of the value comes back: existing and missing paths read the same
    for hub_id in ("hf:squad", "hf:rajpurkar/squad", "hf:owner/name.v2:validation", "hf:o/n:train[:10%]"):
        assert getattr(TuneConfig(**{field: hub_id}), field) == hub_id
    with pytest.raises(ConfigError, match=r"^eval_data: a task:NAME brings its own held-out split"):
        TuneConfig(eval_data="task:json_extract")


def test_hub_data_is_off_in_the_service_unless_the_tuner_allows_it(policy: TunerPolicy) -> None:
    for field in ("data", "eval_data"):
        with pytest.raises(PathRefused, match=rf"^{field}: hub data \(hf:\) is off in this tuner"):
            policy.confine_job(TuneConfig(**{field: "hf:rajpurkar/squad"}))
    allowed = TunerPolicy.create(policy.data_root, policy.output_root, hub_data=True)
    config = allowed.confine_job(TuneConfig(data="hf:rajpurkar/squad", eval_data="hf:owner/held:test"))
    assert (config.data, config.eval_data) == ("hf:rajpurkar/squad", "hf:owner/held:test")
