"""The precision table: MCR from weight sizes and held-out perplexity, against bf16 when it ran."""

from __future__ import annotations

import pytest

from effllm.loadtest.precision import COLUMNS, table


def _rep(precision: str, weight_bytes: int) -> dict:
    return {
        "efficientllm": {
            "weight_bytes": weight_bytes,
            "engine": "vllm",
            "amu_gb": 1.0,
            "al_s": 0.5,
            "at_it_tokens_per_s": 20.0,
            "aec_w": 7.0,
            "j_per_token": 0.3,
            "energy_source": "estimated",
            "precision": precision,
        },
        "throughput": {"tokens_per_s_wall": 40.0},
        "latency_s": {"ttft": {"p50": 0.1}},
        "requests": {"ok": 5, "total": 5},
    }


def test_mcr_is_size_ratio_times_quality_ratio_against_bf16() -> None:
    reports = {"fp32": _rep("fp32", 4000), "bf16": _rep("bf16", 2000), "int4": _rep("int4", 600)}
    quality = {
        "fp32": {"perplexity": 10.0, "method": "fp32"},
        "bf16": {"perplexity": 10.5, "method": "bf16"},
        "int4": {"perplexity": 14.0, "method": "int4(rtn-g64 simulated)"},
    }
    tab = table(reports, quality, {"fp16": "server exited with 1: no fp16 here"})
    assert tab["reference"] == "bf16"
    rec = {r["precision"]: r for r in tab["records"]}
    assert rec["bf16"]["mcr"] == pytest.approx(1.0)
    assert rec["fp32"]["mcr"] == pytest.approx(0.5 * 10.5 / 10.0)
    assert rec["int4"]["mcr"] == pytest.approx((2000 / 600) * (10.5 / 14.0))
    assert rec["fp16"]["error"].startswith("server exited")
    assert all(len(row) == len(COLUMNS) for row in tab["rows"])
    assert "simulated" in tab["rows"][2][COLUMNS.index("perplexity")]


def test_reference_falls_back_to_the_first_precision_and_missing_quality_gives_no_mcr() -> None:
    tab = table({"fp32": _rep("fp32", 4000), "fp16": _rep("fp16", 2000)}, {"fp32": {"perplexity": 9.0}}, {})
    assert tab["reference"] == "fp32"
    rec = {r["precision"]: r for r in tab["records"]}
    assert rec["fp32"]["mcr"] == pytest.approx(1.0) and rec["fp16"]["mcr"] is None
