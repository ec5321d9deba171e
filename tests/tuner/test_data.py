"""Data: malformed JSONL lines fail with file:line and the reason; loss masks cover responses only;
synthetic tasks are deterministic with a disjoint held-out split."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from effllm.tuner import data, tasks
from effllm.tuner.events import Cancelled


@pytest.fixture(scope="module")
def tokenizer() -> Any:
    from transformers import AutoTokenizer

    from effllm.common.model import resolve_model

    return AutoTokenizer.from_pretrained(resolve_model(None).path)


GOOD = [
    {"text": "hello world"},
    {"prompt": "2+2=", "response": "4"},
    {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]},
]


@pytest.mark.parametrize(
    ("bad_line", "why"),
    [
        ("{not json", "not valid JSON"),
        ('["a", "list"]', "expected a JSON object, got list"),
        ('{"prompt": "p"}', "'response' must be a string"),
        ('{"prompt": "p", "response": ""}', "'response' is empty"),
        ('{"text": "t", "prompt": "p", "response": "r"}', "needs exactly one of"),
        ('{"input": "x"}', "needs exactly one of"),
        ('{"messages": [{"role": "user", "content": "hi"}]}', "last message must be the assistant"),
        ('{"messages": [{"role": "robot", "content": "hi"}]}', "messages\\[0\\].role 'robot'"),
        ('{"messages": "hi"}', "'messages' must be a non-empty list"),
    ],
)
def test_malformed_line_names_line_and_reason(tmp_path: Path, bad_line: str, why: str) -> None:
    path = tmp_path / "train.jsonl"
    lines = [json.dumps(r) for r in GOOD] + ["", bad_line, json.dumps(GOOD[0])]
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(data.DataError, match=f"train.jsonl:5: .*{why}"):
        data.read_jsonl(path)


def test_missing_and_empty_files(tmp_path: Path) -> None:
    with pytest.raises(data.DataError, match="no such file"):
        data.read_jsonl(tmp_path / "nope.jsonl")
    (tmp_path / "empty.jsonl").write_text("\n\n")
    with pytest.raises(data.DataError, match="no records"):
        data.read_jsonl(tmp_path / "empty.jsonl")


def test_file_split_is_deterministic_and_hashed(tmp_path: Path) -> None:
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps({"prompt": f"q{i}", "response": f"a{i}"}) + "\n" for i in range(20)))
    a = data.load_dataset(str(path), eval_fraction=0.25)
    b = data.load_dataset(str(path), eval_fraction=0.25)
    assert (len(a.train), len(a.eval)) == (15, 5)
    assert a.sha256 == b.sha256 and not {r["prompt"] for r in a.train} & {r["prompt"] for r in a.eval}


@pytest.mark.model
def test_chat_loss_covers_assistant_turn_only(tokenizer: Any) -> None:
    enc = data.Encoder(tokenizer, 512)
    record = {
        "messages": [
            {"role": "user", "content": "Say hi"},
            {"role": "assistant", "content": "Hi there!"},
            {"role": "user", "content": "Again"},
            {"role": "assistant", "content": "Hi again!"},
        ]
    }
    e = enc.encode(record)
    labelled = tokenizer.decode([t for t in e.labels if t != data.IGNORE])
    assert labelled == "Hi there!<|im_end|>\nHi again!<|im_end|>\n"
    # The prompt part is what a server feeds the model: the chat template with the generation prompt.
    prompt_ids, ref = enc.prompt_and_reference(record)  # type: ignore[misc]
    assert ref == "Hi again!" and e.input_ids[: len(prompt_ids)] == prompt_ids
    first = enc.chat_prompt_ids(record["messages"][:1])
    assert e.input_ids[: len(first)] == first
    assert all(x == data.IGNORE for x in e.labels[: len(first)])


@pytest.mark.model
def test_prompt_response_and_text_masks(tokenizer: Any) -> None:
    enc = data.Encoder(tokenizer, 512)
    e = enc.encode({"prompt": "The capital of France is", "response": " Paris"})
    assert tokenizer.decode([t for t in e.labels if t != data.IGNORE]) == " Paris" + tokenizer.eos_token
    t = enc.encode({"text": "abc def"})
    assert t.labels == t.input_ids
    short = data.Encoder(tokenizer, 8).encode({"prompt": "word " * 20, "response": "x"})
    assert len(short.input_ids) == 8 and short.n_target == 0
    with pytest.raises(data.DataError, match="no example has a response token within max_length 8"):
        data.encode_all(data.Encoder(tokenizer, 8), [{"prompt": "word " * 20, "response": "x"}], "d")


def test_tasks_are_deterministic_and_held_out_is_unseen() -> None:
    for name in tasks.TASKS:
        train, held = tasks.generate(name, 200, 40, seed=3)
        again, held_again = tasks.generate(name, 200, 40, seed=3)
        assert train == again and held == held_again
        prompts = {r["messages"][0]["content"] for r in train}  # type: ignore[index]
        assert len(held) == 40 and not prompts & {r["messages"][0]["content"] for r in held}  # type: ignore[index]
        assert tasks.generate(name, 200, 40, seed=4)[0] != train
    with pytest.raises(ValueError, match="unknown task 'nope'"):
        tasks.generate("nope", 1, 1)


def test_hub_data_never_reads_a_local_folder_of_the_same_name(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`datasets.load_dataset` takes a local folder (or a packaged builder globbing the current folder)
    before the hub: the tuner calls it from an empty folder. A fake `datasets` records what it would see."""
    import os
    import sys
    import types

    (tmp_path / "owner" / "name").mkdir(parents=True)
    (tmp_path / "owner" / "name" / "train.jsonl").write_text('{"text": "local secret"}\n')
    monkeypatch.chdir(tmp_path)
    seen: dict[str, Any] = {}

    def load_dataset(path: str, split: str) -> list[dict[str, str]]:
        seen.update(path=path, split=split, cwd=os.getcwd(), local=os.path.exists(path), ls=os.listdir())
        return [{"text": "from the hub"}]

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    ds = data.load_dataset("hf:owner/name:validation", eval_data="hf:owner/held", n_eval=4)
    assert ds.train == [{"text": "from the hub"}] and ds.eval == [{"text": "from the hub"}]
    assert seen["path"] == "owner/held" and not seen["local"] and seen["ls"] == []
    assert Path(seen["cwd"]) != tmp_path and Path.cwd() == tmp_path  # and the folder is given back


def test_task_generation_stops_when_asked() -> None:
    polls = []

    def stop() -> bool:
        polls.append(1)
        return len(polls) > 3

    with pytest.raises(Cancelled):
        tasks.generate("json_extract", 10_000_000, 0, should_stop=stop)
    assert len(polls) == 4  # one poll per 1,024 examples: stopped after ~3,000, not 10 million
