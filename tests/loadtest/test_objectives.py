"""Objective mixes and budgets (loadtest/objectives.py), the requests and rows they make (loadtest/wire.py),
the per-objective table (report.per_objective, render), and one REAL Locust campaign with objectives
against the shared vLLM server."""

from __future__ import annotations

import argparse
import json
import re
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from effllm.api.objectives import objective_value
from effllm.api.v1 import generation_pb2 as pb
from effllm.cli.main import build_parser
from effllm.common.budget import Budget
from effllm.loadtest.campaign import Campaign, run
from effllm.loadtest.cli import workload_from_args
from effllm.loadtest.config import LoadConfig
from effllm.loadtest.objectives import OBJECTIVES, ModelMix, ObjectiveMix
from effllm.loadtest.options import config_from_options
from effllm.loadtest.render import markdown, variant_shares
from effllm.loadtest.report import build, per_objective, read_rows
from effllm.loadtest.traces import ServerSpan
from effllm.loadtest.wire import generate_request, reply_fields
from effllm.loadtest.workload import LengthDist, PromptSource, Workload

from ..serverproc import ServerProcess

MIX = "latency=0.4,energy=0.4,quality=0.2"


def _workload(seed: int = 3, objectives: str = MIX, budget: str = "") -> Workload:
    return Workload(
        seed=seed,
        rate=2.0,
        prompts=PromptSource("synthetic", LengthDist.parse("uniform:4-12")),
        output=LengthDist.parse("uniform:4-8"),
        objectives=ObjectiveMix.parse(objectives),
        budget=Budget.parse(budget),
    )


def test_same_seed_same_arrivals_and_objectives() -> None:
    a, b = _workload().requests(0), _workload().requests(0)
    sent = [(a.next(), a.gap(2.0)) for _ in range(200)]
    assert sent == [(b.next(), b.gap(2.0)) for _ in range(200)]
    assert {spec.objective for spec, _ in sent} == {"latency", "energy", "quality"}
    other = _workload(seed=4).requests(0)
    assert [s.objective for s, _ in sent] != [other.next().objective for _ in range(200)]
    # the mix draws on a generator of its own: without it, the same seed sends the same prompts,
    # lengths and arrival gaps (only the objective is missing)
    plain = _workload(objectives="").requests(0)
    assert [(replace(s, objective=""), g) for s, g in sent] == [
        (plain.next(), plain.gap(2.0)) for _ in range(200)
    ]
    # every Locust process gets the workload as JSON: mix and budget survive it
    cfg = LoadConfig(workload=_workload(budget="max_ttft_s=0.5,min_quality=0.9"))
    back = LoadConfig.from_dict(json.loads(cfg.to_json()))
    assert back == cfg
    assert back.workload.budget == Budget(max_ttft_s=0.5, min_quality=0.9)


def test_weights_are_honoured_over_10k_draws() -> None:
    stream = _workload(objectives=MIX + ",balanced=0").requests(0)
    picks = [stream.next().objective for _ in range(10_000)]
    for name, p in (("latency", 0.4), ("energy", 0.4), ("quality", 0.2)):
        assert picks.count(name) / len(picks) == pytest.approx(p, abs=0.02), name  # 4 σ at p = 0.4
    assert "balanced" not in picks  # weight 0: never drawn
    mix = ObjectiveMix.parse("energy=3, latency=1")  # weights need not sum to 1
    rng = np.random.default_rng(9)
    draws = [mix.pick(rng) for _ in range(10_000)]
    assert draws.count("energy") / len(draws) == pytest.approx(0.75, abs=0.02)
    assert ObjectiveMix.parse("quality").names == ("quality",)  # a bare name weighs 1
    assert ObjectiveMix.parse("") is None and Budget.parse("") is None


@pytest.mark.parametrize(
    ("text", "why"),
    [
        ("speed=1", "unknown objective 'speed'"),
        ("latency=-0.1", "a weight must be >= 0"),
        ("latency=abc", "'abc' is not a number"),
        ("latency=inf", "must be finite"),
        ("latency=0,energy=0", "the weights sum to 0"),
        ("latency=1,latency=2", "latency is given twice"),
        (",", "use NAME=WEIGHT"),
    ],
)
def test_bad_objectives_are_refused_naming_the_flag(
    text: str, why: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(ValueError, match=re.escape(why)) as err:
        ObjectiveMix.parse(text)
    assert str(err.value).startswith("--objectives")
    # `effllm load` refuses before it starts anything (exit 2, the flag named)
    args = build_parser().parse_args(["load", "--target", "127.0.0.1:1", "--rate", "1", "--objectives", text])
    assert args.func(args) == 2
    assert "--objectives" in capsys.readouterr().err
    # and the Locust option names itself as Locust shows it
    with pytest.raises(ValueError, match="--effllm-objectives"):
        config_from_options(argparse.Namespace(effllm_objectives=text), "127.0.0.1:1", users=1)


def test_the_flags_reach_the_workload() -> None:
    args = build_parser().parse_args(
        ["load", "--rate", "1", "--objectives", "energy=3,latency=1", "--budget", "max_tpot_s=0.2"]
    )
    w = workload_from_args(args)
    assert w.objectives == ObjectiveMix(("energy", "latency"), (3.0, 1.0))
    assert w.budget == Budget(max_tpot_s=0.2)
    assert workload_from_args(build_parser().parse_args(["load", "--rate", "1"])).objectives is None
    ns = argparse.Namespace(effllm_objectives="quality", effllm_budget="min_quality=0.9")
    cfg = config_from_options(ns, "127.0.0.1:1", users=1)  # Locust's own --effllm-* options
    assert cfg.workload.objectives == ObjectiveMix(("quality",), (1.0,))
    assert cfg.workload.budget == Budget(min_quality=0.9)


@pytest.mark.parametrize(
    ("text", "why"),
    [
        ("max_ttft_s=0", "must be > 0"),
        ("min_quality=1.5", "must be in [0, 1]"),
        ("speed=1", "use max_ttft_s=X"),
        ("max_tpot_s", "use max_ttft_s=X"),
        ("max_ttft_s=1,max_ttft_s=2", "given twice"),
    ],
)
def test_bad_budgets_are_refused_naming_the_flag(text: str, why: str) -> None:
    with pytest.raises(ValueError, match=re.escape(why)) as err:
        Budget.parse(text)
    assert str(err.value).startswith("--budget")


def test_the_request_carries_objective_and_budget_and_the_row_reads_the_final_message() -> None:
    w = _workload(budget="max_ttft_s=0.5,max_j_per_token=2")
    spec = w.requests(0).next()
    req = generate_request(spec, w, "rid-1")
    assert req.objective == pb.Objective.Value("OBJECTIVE_" + spec.objective.upper())
    assert req.HasField("budget") and req.budget.max_time_to_first_token_s == 0.5
    assert req.budget.max_joules_per_token == 2.0 and not req.budget.HasField("min_quality")
    assert req.request_id == "rid-1" and req.sampling.max_new_tokens == spec.max_new_tokens
    plain = _workload(objectives="")
    req = generate_request(plain.requests(0).next(), plain, "r")
    assert req.objective == pb.OBJECTIVE_UNSPECIFIED and not req.HasField("budget")
    # every name the mix accepts is one of the proto's objectives, and each of those has a name
    assert {pb.Objective.Name(objective_value(n)) for n in OBJECTIVES} == set(pb.Objective.keys())

    usage = pb.Usage(output_tokens=4, energy_joules=1.5, energy_source="estimated")
    row = reply_fields(pb.StreamFinal(variant="int4:hf", budget_met=False, usage=usage))
    assert row["variant"] == "int4:hf" and row["budget_met"] is False
    assert row["usage_energy_j"] == 1.5 and row["usage_energy_source"] == "estimated"
    older = reply_fields(pb.GenerateResponse(usage=pb.Usage(output_tokens=4)))  # a server without #14
    assert older["variant"] is None and older["budget_met"] is None and older["usage_energy_j"] is None
    assert older["replica"] is None  # a plain server; through a cluster front it names the replica
    assert reply_fields(pb.StreamFinal(replica="r1", usage=usage))["replica"] == "r1"


def _row(rid: str, objective: str | None, ttft: float, tokens: int, **kw: Any) -> dict[str, Any]:
    t0 = 1000.0 + len(rid)
    e2e = ttft + 0.05 * tokens
    row = {
        "rid": rid,
        "objective": objective,
        "adapter": "",
        "status": "OK",
        "t_start": t0,
        "t_end": t0 + e2e,
    }
    row.update(ttft_s=ttft, e2e_s=e2e, tpot_s=0.05, output_tokens=tokens, itl_s=[], max_new_tokens=tokens)
    row.update(kw)
    return row


def test_per_objective_aggregation_on_synthetic_rows() -> None:
    rows = [
        _row(
            "l1", "latency", 0.1, 10, variant="fp32:hf", usage_energy_j=1.0, usage_energy_source="estimated"
        ),
        _row(
            "l2", "latency", 0.2, 10, variant="fp32:hf", usage_energy_j=2.0, usage_energy_source="estimated"
        ),
        _row("l3", "latency", 0.3, 10, variant="int4:hf"),  # energy only in the server's span
        _row("l4", "latency", 0.4, 10, variant="fp32:hf"),  # no energy figure at all
        _row("e1", "energy", 0.5, 20, variant="int4:hf", usage_energy_j=2.0, budget_met=True),
        _row("e2", "energy", 0.7, 20, variant="int4:hf", usage_energy_j=2.0, budget_met=False),
        _row("e3", "energy", 0.0, 0, status="FAILED_PRECONDITION", ttft_s=None),
        _row("x1", None, 0.9, 5),  # stated no objective: in the report, not in the table
    ]
    span = ServerSpan(
        "t", "s", "generate m", 0, 1, {"effllm.energy_j": 6.0, "effllm.energy.source": "estimated"}
    )
    per = per_objective(rows, {"l3": span})
    assert list(per) == ["energy", "latency"]
    lat, en = per["latency"], per["energy"]
    assert lat["requests"] == lat["ok"] == 4 and lat["errors"] == {} and lat["output_tokens"] == 40
    # linear interpolation between closest ranks: telemetry.metrics.percentile, as `effllm report` reads
    assert lat["ttft_s"]["p50"] == pytest.approx(0.25) and lat["ttft_s"]["p99"] == pytest.approx(0.397)
    assert lat["j_per_token"] == pytest.approx((1.0 + 2.0 + 6.0) / 30)  # l4 has none: out of both sums
    assert lat["energy_coverage"] == 0.75 and lat["energy_from"] == "server spans+usage.energy_joules"
    assert lat["variants"] == {"fp32:hf": 0.75, "int4:hf": 0.25}
    assert lat["budget_judged"] == 0 and lat["budget_met_share"] is None
    assert en["requests"] == 3 and en["ok"] == 2 and en["errors"] == {"FAILED_PRECONDITION": 1}
    assert en["j_per_token"] == pytest.approx(4.0 / 40) and en["energy_source"] == "unknown"  # no source sent
    assert (en["budget_judged"], en["budget_met"], en["budget_met_share"]) == (2, 1, 0.5)
    assert en["e2e_s"]["n"] == 2

    rep = build(rows)  # no spans: l3's energy is unknown there
    assert rep["per_objective"] == per_objective(rows, {})
    assert rep["per_objective"]["latency"]["j_per_token"] == pytest.approx(3.0 / 20)
    md = markdown({"mix": rep})
    assert "### Per objective" in md and "fp32:hf 75 %, int4:hf 25 %" in md
    assert "2 / 3 (FAILED_PRECONDITION=1)" in md and "1 of 2 (50 %)" in md
    assert variant_shares({}) == "—"
    # without objectives the report is as before: no table, no key
    plain = [{**r, "objective": None} for r in rows]
    assert "per_objective" not in build(plain) and "Per objective" not in markdown({"plain": build(plain)})


def test_real_campaign_with_objectives(vllm_server: ServerProcess, tmp_path: Path) -> None:
    """Real Locust against the shared vLLM server: every request states its drawn objective (the same
    sequence a replay of the seed gives) and a budget, and the report has one row per objective."""
    wl = Workload(
        seed=5,
        mode="open",
        rate=3.0,
        prompts=PromptSource("synthetic", LengthDist.parse("12")),
        output=LengthDist.parse("6"),
        ignore_eos=True,
        objectives=ObjectiveMix.parse("latency=1,energy=1,quality=1"),
        budget=Budget.parse("max_ttft_s=600"),  # met by any server that is up
    )
    cfg = LoadConfig(
        targets=(vllm_server.target,), workload=wl, duration_s=3.0, timeout_s=60.0, run_dir=str(tmp_path)
    )
    rep = run(Campaign(cfg, label="objectives"))  # the server's figures over the wire (GetTelemetry)
    assert rep["requests"]["errors"] == {} and rep["requests"]["total"] >= 3
    rows = sorted(read_rows(tmp_path), key=lambda r: r["index"])
    replay = wl.requests(0)  # one local Locust process: stream 0
    assert [r["index"] for r in rows] == list(range(len(rows)))
    assert [r["objective"] for r in rows] == [replay.next().objective for _ in rows]
    per = rep["per_objective"]
    assert set(per) == {r["objective"] for r in rows}
    assert sum(o["requests"] for o in per.values()) == len(rows)
    for name, o in per.items():
        assert o["ok"] == o["requests"] and o["output_tokens"] == 6 * o["ok"], name
        assert 0 < o["ttft_s"]["p50"] <= o["e2e_s"]["p50"], name
        assert o["j_per_token"] > 0 and o["energy_source"] and o["energy_coverage"] == 1.0, name
    assert "### Per objective" in (tmp_path / "report.md").read_text()

    # The server names the variant that served each request, answers budget_met for a request with a
    # budget, and puts the request's energy on its final message.
    with vllm_server.client() as client:
        names = [v.name for v in client.model_info().variants]
    assert len(names) == 1, names  # a single-variant server lists its one variant
    for name, o in per.items():
        assert o["variants"] == {names[0]: 1.0}, name
        assert o["budget_met_share"] == 1.0 and o["budget_judged"] == o["ok"], name
        assert o["energy_from"] == "usage.energy_joules", name


def test_a_model_mix_sends_the_same_requests_each_naming_its_drawn_model() -> None:
    mixed = replace(_workload(objectives=""), models=ModelMix.parse("a=0.7,b=0.3"))
    stream, plain = mixed.requests(0), _workload(objectives="").requests(0)
    sent = [(stream.next(), stream.gap(2.0)) for _ in range(2000)]
    # its own generator: the same prompts, lengths and arrivals as without a mix, only the model added
    assert [(replace(s, model=""), g) for s, g in sent] == [
        (plain.next(), plain.gap(2.0)) for _ in range(2000)
    ]
    share = sum(s.model == "a" for s, _ in sent) / len(sent)
    assert {s.model for s, _ in sent} == {"a", "b"} and 0.65 < share < 0.75
    assert LoadConfig.from_dict(json.loads(LoadConfig(workload=mixed).to_json())).workload == mixed
    on_b = next(s for s, _ in sent if s.model == "b")
    assert generate_request(on_b, mixed, "r1").model == "b"
    assert not generate_request(plain.next(), _workload(objectives=""), "r2").HasField("model")
    w = workload_from_args(build_parser().parse_args(["load", "--rate", "1", "--models", "x=2,y"]))
    assert w.models == ModelMix(("x", "y"), (2.0, 1.0))
    ns = argparse.Namespace(effllm_models="solo")
    assert config_from_options(ns, "127.0.0.1:1", users=1).workload.models == ModelMix(("solo",), (1.0,))
    assert ModelMix.parse("") is None
    for bad, why in (
        ("a=1,a=2", "given twice"),
        ("a=-1", ">= 0"),
        ("=1", "name is missing"),
        (",", "use NAME"),
    ):
        with pytest.raises(ValueError, match=re.escape(why)) as err:
            ModelMix.parse(bad)
        assert str(err.value).startswith("--models")


def test_the_report_has_a_table_per_model() -> None:
    rows = [
        _row("a1", None, 0.1, 10, model="a", variant="fp32:hf"),
        _row("a2", None, 0.3, 10, model="a", variant="fp32:hf"),
        _row("b1", None, 0.2, 20, model="b", variant="fp32:hf"),
        _row("b2", None, 0.0, 0, model="b", status="RESOURCE_EXHAUSTED", ttft_s=None),
    ]
    rep = build(rows)
    per = rep["per_model"]
    assert list(per) == ["a", "b"] and per["a"]["ok"] == 2 and per["a"]["output_tokens"] == 20
    assert per["b"]["requests"] == 2 and per["b"]["errors"] == {"RESOURCE_EXHAUSTED": 1}
    md = markdown({"two models": rep})
    assert "### Per model" in md and "| model | ok / requests |" in md
    assert "per_model" not in build([{**r, "model": None} for r in rows])
