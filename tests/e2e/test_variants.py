"""One server, two variants (fp32 and int4 of the default model, both on the hf engine): requests state an
objective and the router picks the variant from live figures (issue 14).

ENERGY goes to the lowest live J/token among the variants meeting the budget; QUALITY never to the worse
variant while the better meets the budget; LATENCY moves to the other variant while one is loaded; a strict
budget nobody meets is refused and runs nothing; an adapter only one variant holds (DoRA: not at int4 on
CPU) routes only there; per-request energy sums to the meter's energy over the run; the route is on the
span. One server for the module (two engines start in well under a minute).
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from effllm.api.v1 import generation_pb2 as pb
from effllm.api.v1 import generation_pb2_grpc as pb_grpc
from effllm.client import EffllmClient, build_request
from effllm.server.variants import START_UP_REPEATS
from effllm.telemetry.otlpjson import read_spans

from ..adapterroot import AdapterRoot
from ..serverproc import ServerProcess, start_server
from .conftest import energy_choices, variants_by_name, wait_idle

PROMPT = "Once upon a time, in a small village by the sea,"
SLOTS = 4
FP32, INT4 = "fp32:hf", "int4:hf"
HF_PARITY_REL = 1e-3  # the same float32 forward as loadtest/quality.py; see test_variants_vllm.py for vLLM


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("variants-run")


@pytest.fixture(scope="module")
def server(adapter_root: AdapterRoot, run_dir: Path, logs_dir: Path) -> Iterator[ServerProcess]:
    proc = start_server(
        "--variant",
        FP32,
        "--variant",
        INT4,
        "--max-concurrency",
        str(SLOTS),
        "--queue-size",
        "16",
        "--max-context",
        "512",
        "--adapter-root",
        str(adapter_root.root),
        "--max-adapter-rank",
        "16",
        "--run-dir",
        str(run_dir),
        log_dir=logs_dir,
        ready_timeout=600,
    )
    yield proc
    assert proc.stop() == 0


def test_model_info_lists_both_variants_with_start_up_quality(
    server: ServerProcess, reference_perplexity: float
) -> None:
    with server.client() as c:
        info = c.model_info()
        v = variants_by_name(c)
    assert set(v) == {FP32, INT4} and info.variants[0].name == FP32  # the first --variant is the default
    assert info.precision == "fp32" and info.engine == "hf"
    # quality: measured on each variant's own kernels, relative to the best (fp32 here)
    assert v[FP32].quality == pytest.approx(1.0) and 0 < v[INT4].quality < 1.0
    assert 1.0 < v[FP32].perplexity < v[INT4].perplexity
    # the hf engine's score is transformers' forward on the same ids: it agrees with the reference
    assert v[FP32].perplexity == pytest.approx(reference_perplexity, rel=HF_PARITY_REL)
    assert v[INT4].weight_bytes < v[FP32].weight_bytes / 2
    assert "dora" in v[FP32].adapter_methods and "dora" not in v[INT4].adapter_methods
    for name in (FP32, INT4):  # start-up estimates until requests arrive: medians of the repeats
        live = v[name].live
        assert live.time_per_output_token_s > 0 and live.joules_per_token > 0 and live.energy_source
        assert (
            live.joules.samples == START_UP_REPEATS
            and live.joules.low <= live.joules_per_token <= live.joules.high
        )


def test_energy_request_goes_to_the_lowest_live_joules_per_token_meeting_its_budget(
    server: ServerProcess,
) -> None:
    with server.client() as c:
        for i in range(3):
            v = variants_by_name(c)
            reply = c.generate(PROMPT, max_new_tokens=6, ignore_eos=True, objective="energy")
            assert reply.variant in energy_choices(v), (i, {n: v[n].live.joules for n in v})
            assert not reply.HasField("budget_met")  # no budget
        # a budget only fp32 meets (quality 1.0): served there, budget met
        v = variants_by_name(c)
        reply = c.generate(PROMPT, max_new_tokens=4, objective="energy", budget={"min_quality": 0.9999})
        assert reply.variant == FP32 and reply.budget_met is True
        # a J/token budget both meet: the cheaper one still (or one tied with it within their spread)
        v = variants_by_name(c)
        loose = 100 * max(x.live.joules_per_token for x in v.values())
        reply = c.generate(
            PROMPT, max_new_tokens=4, objective="energy", budget={"max_joules_per_token": loose}
        )
        assert reply.variant in energy_choices(v) and reply.budget_met is True


def test_quality_request_never_goes_to_the_worse_variant_while_the_better_meets_its_budget(
    server: ServerProcess,
) -> None:
    with server.client() as c:
        for budget in (None, {"max_time_to_first_token_s": 600.0}, {"min_quality": 0.5}):
            for _ in range(2):
                reply = c.generate(PROMPT, max_new_tokens=4, objective="quality", budget=budget)
                assert reply.variant == FP32
                assert reply.HasField("budget_met") == (budget is not None)


def _load(client: EffllmClient) -> dict[str, int]:
    return {v.name: v.live.running + v.live.queue_depth for v in client.model_info().variants}


def _admitted(client: EffllmClient) -> int:
    """Requests running, queued or finished (the runner counts a request in requests_total when it ends)."""
    s = client.stats()
    return s.running + s.queued + s.requests_total


def test_latency_requests_move_to_the_other_variant_while_one_is_loaded(server: ServerProcess) -> None:
    """Long LATENCY streams, sent one at a time, each admitted (running or queued) before the next: the
    first goes to the variant predicted fastest when idle; as its load grows (rows slowing its steps, then a
    queue to wait through), one goes to the other variant while the first still holds its requests."""
    with server.client() as c:
        wait_idle(c)
        stub = pb_grpc.GenerationServiceStub(c.channel)
        calls = []
        first, load = "", {}
        base = _admitted(c)
        try:
            for i in range(2 * SLOTS + 8):
                req = build_request(
                    PROMPT, max_new_tokens=400, ignore_eos=True, objective="latency", request_id=f"lat-{i}"
                )
                calls.append(stub.GenerateStream(req, timeout=600))  # the call starts now; never read
                deadline = time.monotonic() + 60
                while _admitted(c) < base + i + 1:
                    assert time.monotonic() < deadline, "a LATENCY request was not admitted"
                    time.sleep(0.05)
                load = _load(c)
                if not first:
                    (first,) = [name for name, n in load.items() if n]
                elif any(n for name, n in load.items() if name != first):
                    break
            assert load[first] >= 1 and all(load.values()), load
        finally:
            for call in calls:
                call.cancel()
        wait_idle(c)


def test_strict_budget_nobody_meets_is_refused_and_runs_nothing(server: ServerProcess) -> None:
    impossible = {"max_time_per_output_token_s": 1e-9}
    with server.client() as c:
        wait_idle(c)
        before = c.stats()
        with pytest.raises(grpc.RpcError) as err:
            c.generate(PROMPT, max_new_tokens=4, objective="latency", budget=impossible, strict_budget=True)
        assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "budget.max_time_per_output_token_s" in (err.value.details() or "")
        after = c.stats()
        assert (after.requests_total, after.output_tokens_total, after.requests_rejected) == (
            before.requests_total,
            before.output_tokens_total,
            before.requests_rejected,
        )
        # not strict: served on the closest variant, saying the budget was not met
        reply = c.generate(PROMPT, max_new_tokens=4, objective="latency", budget=impossible)
        assert reply.budget_met is False and reply.variant in (FP32, INT4) and reply.usage.output_tokens == 4
        # a malformed budget is refused naming its field
        with pytest.raises(grpc.RpcError) as err:
            c.generate(PROMPT, max_new_tokens=4, budget={"min_quality": 1.5})
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert (err.value.details() or "").startswith("budget.min_quality")


def test_an_adapter_only_some_variants_hold_routes_only_to_them(server: ServerProcess) -> None:
    with server.client() as c:
        dora = c.load_adapter("dora", "1")
        assert list(dora.variants) == [FP32]
        assert len(dora.skipped_variants) == 1 and dora.skipped_variants[0].startswith(f"{INT4}: dora")
        lora = c.load_adapter("demo", "1")
        assert sorted(lora.variants) == sorted([FP32, INT4]) and not lora.skipped_variants
        listed = {f"{a.name}@{a.version}": a for a in c.list_adapters()}
        assert list(listed["dora@1"].variants) == [FP32]
        for objective in ("energy", "latency", "balanced", "quality"):
            reply = c.generate(PROMPT, max_new_tokens=3, adapter="dora", objective=objective)
            assert reply.variant == FP32 and reply.adapter == "dora@1"
        # the LoRA may go to either; with the energy objective to the cheaper one
        v = variants_by_name(c)
        reply = c.generate(PROMPT, max_new_tokens=3, adapter="demo@1", objective="energy")
        assert reply.variant in energy_choices(v)


def test_per_request_energy_sums_to_the_meters_energy_over_the_run(server: ServerProcess) -> None:
    """Σ usage.energy_joules of requests that kept the server busy from the first one's start to the last
    one's end = the meter's energy over that window (nothing was idle in it, so the idle share is ~0);
    the sampler's 10 Hz edges bound the difference."""
    n = 2 * SLOTS
    finals: dict[str, pb.StreamFinal] = {}
    ids = [f"energy-sum-{i}-{time.time_ns()}" for i in range(n)]

    def one(rid: str, objective: str) -> None:
        with server.client() as c:
            for chunk in c.stream(
                PROMPT, max_new_tokens=64, ignore_eos=True, objective=objective, request_id=rid
            ):
                if chunk.HasField("final"):
                    finals[rid] = chunk.final

    with server.client() as c:
        wait_idle(c)
    # quality pins fp32, energy goes to the cheaper: both variants busy
    threads = [
        threading.Thread(target=one, args=(rid, ("quality", "energy")[i % 2])) for i, rid in enumerate(ids)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    assert set(finals) == set(ids)
    assert {f.variant for f in finals.values()} <= {FP32, INT4}
    for f in finals.values():
        assert f.usage.HasField("energy_joules") and f.usage.energy_joules > 0
        assert f.usage.energy_source == "estimated"
    total = sum(f.usage.energy_joules for f in finals.values())
    with server.client() as c:
        figures = {r.request_id: r for r in c.telemetry().requests if r.request_id in finals}
        assert set(figures) == set(ids)
        for rid, r in figures.items():
            assert r.energy_j == pytest.approx(finals[rid].usage.energy_joules)
            assert r.variant == finals[rid].variant and r.objective in ("quality", "energy")
        start = min(r.start_unix_s for r in figures.values())
        end = max(r.end_unix_s for r in figures.values())
        time.sleep(0.3)  # the sampler's next sample after `end`
        meter = c.telemetry(start, end).resources
    assert meter.energy_source == "estimated"
    assert total == pytest.approx(meter.energy_j, rel=0.05), (total, meter.energy_j, end - start)


def test_the_route_is_on_the_span(server: ServerProcess, run_dir: Path) -> None:
    rid = f"route-span-{time.time_ns()}"
    with server.client() as c:
        final = c.generate(PROMPT, max_new_tokens=3, objective="energy", request_id=rid)
    trace_file = run_dir / "traces.jsonl"
    deadline = time.monotonic() + 20  # the batch span processor exports every 5 s
    while time.monotonic() < deadline and (not trace_file.exists() or rid not in trace_file.read_text()):
        time.sleep(0.5)
    (span,) = [s for s in read_spans(trace_file) if s.attributes.get("gen_ai.response.id") == rid]
    a = span.attributes
    assert a["effllm.route.objective"] == "energy" and a["effllm.route.variant"] == final.variant
    assert a["effllm.precision"] == final.variant.split(":")[0] and a["effllm.engine"] == "hf"
    assert "energy" in a["effllm.route.reason"]
    candidates = json.loads(a["effllm.route.candidates"])
    assert set(candidates) == {FP32, INT4} and all(c["j_per_token"] > 0 for c in candidates.values())
