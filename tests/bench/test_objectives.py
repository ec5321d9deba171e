"""bench/objectives.py's comparison (bench/_objectives_table.py): refused unless every server answered the
same requests with the same token counts; quality from the variants' perplexities; ratios of the mixed
server to each single-variant server; the issue's targets as PASS / MISS / n/a."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "bench" / "_objectives_table.py"


@pytest.fixture(scope="module")
def tab() -> ModuleType:
    # bench/ is scripts, not a package: load the file itself (it imports only the stdlib).
    spec = importlib.util.spec_from_file_location("bench_objectives_table", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _rows(n: int = 4, **change: Any) -> list[dict[str, Any]]:
    objectives = ("latency", "energy", "quality", "latency")
    rows = [
        {
            "stream": 0,
            "index": i,
            "objective": objectives[i % 4],
            "status": "OK",
            "max_new_tokens": 8,
            "output_tokens": 8,
            "input_tokens": 20 + i,
        }
        for i in range(n)
    ]
    for key, value in change.items():
        rows[1][key] = value
    return rows


def test_same_requests_pass_and_every_difference_is_refused(tab: ModuleType) -> None:
    assert tab.check_same_requests({"mixed": _rows(), "fp32:hf": _rows()}) is None
    cases = {
        "2 of": [*_rows(status="FAILED_PRECONDITION"), {**_rows()[0], "index": 9, "status": "UNAVAILABLE"}],
        "run with ignore_eos": _rows(output_tokens=3),
        "not the same arrivals": _rows(3),
        "on fp32:hf": _rows(objective="quality"),  # same index, another objective
        "recorded twice": [*_rows(), _rows()[0]],
    }
    for why, rows in cases.items():
        reason = tab.check_same_requests({"mixed": _rows(), "fp32:hf": rows})
        assert reason is not None and why in reason, (why, reason)
    assert "no request" in tab.check_same_requests({"mixed": []})


def _objective(j: float | None, ttft_p50: float, variants: dict[str, float], n: int = 10) -> dict[str, Any]:
    return {
        "requests": n,
        "j_per_token": j,
        "energy_source": "estimated",
        "energy_from": "usage.energy_joules",
        "ttft_s": {"p50": ttft_p50, "p99": 2 * ttft_p50},
        "variants": variants,
    }


def _servers() -> dict[str, dict[str, Any]]:
    both = [{"name": "fp32:hf", "perplexity": 10.0}, {"name": "int4:hf", "perplexity": 12.5}]
    return {
        "mixed": {
            "variants": both,
            "per_objective": {
                "energy": _objective(0.5, 0.3, {"int4:hf": 1.0}),
                "latency": _objective(0.8, 0.12, {"int4:hf": 0.5, "fp32:hf": 0.5}),
                "quality": _objective(1.0, 0.2, {"fp32:hf": 1.0}),
            },
        },
        # older single-variant servers: no variant named in replies, no perplexity of their own
        "fp32:hf": {
            "variant": "fp32:hf",
            "variants": [],
            "per_objective": {
                k: _objective(1.0, 0.15, {"(unnamed)": 1.0}) for k in ("energy", "latency", "quality")
            },
        },
        "int4:hf": {
            "variant": "int4:hf",
            "variants": [{"name": "int4:hf", "perplexity": 99.0}],  # the mixed server's figure wins
            "per_objective": {
                k: _objective(0.4, 0.1, {"int4:hf": 1.0}) for k in ("energy", "latency", "quality")
            },
        },
    }


def test_quality_target_counts_every_variant_as_good_as_the_best(tab: ModuleType) -> None:
    # bf16 0.05 % better than fp32 on the held-out set: both are "the best-quality variant"
    servers = _servers()
    servers["mixed"]["variants"] = [
        {"name": "fp32:hf", "perplexity": 10.005},
        {"name": "bf16:hf", "perplexity": 10.0},
        {"name": "int4:hf", "perplexity": 12.5},
    ]
    servers["mixed"]["per_objective"]["quality"] = _objective(1.0, 0.2, {"fp32:hf": 0.75, "bf16:hf": 0.25})
    out = tab.compare(servers, reference="fp32:hf", budget=False)
    assert out["best_variants"] == ["bf16:hf", "fp32:hf"]
    assert out["targets"]["quality"]["verdict"] == "PASS"
    servers["mixed"]["per_objective"]["quality"] = _objective(1.0, 0.2, {"fp32:hf": 0.9, "int4:hf": 0.1})
    t = tab.compare(servers, reference="fp32:hf", budget=False)["targets"]["quality"]
    assert t["verdict"] == "MISS" and t["share_on_best"] == pytest.approx(0.9)


def test_compare_quality_ratios_and_targets(tab: ModuleType) -> None:
    out = tab.compare(_servers(), reference="fp32:hf", budget=False)
    assert out["quality"] == pytest.approx({"fp32:hf": 1.0, "int4:hf": 0.8})
    assert out["best_variants"] == ["fp32:hf"]
    cell = {(r["server"], r["objective"]): r for r in out["rows"]}
    assert cell[("mixed", "energy")]["quality"] == pytest.approx(0.8)
    assert cell[("mixed", "latency")]["quality"] == pytest.approx(0.9)  # half on each
    assert cell[("fp32:hf", "energy")]["variants"] == {"fp32:hf": 1.0}  # its one variant
    assert cell[("fp32:hf", "energy")]["quality"] == pytest.approx(1.0)
    assert cell[("mixed", "energy")]["vs"]["fp32:hf"]["j_per_token"] == pytest.approx(0.5)
    assert cell[("mixed", "latency")]["vs"]["int4:hf"]["ttft_p50"] == pytest.approx(1.2)
    assert "vs" not in cell[("int4:hf", "energy")]
    t = out["targets"]
    assert t["energy"] == {"verdict": "PASS", "ratio": pytest.approx(0.5), "bound": 0.7, "against": "fp32:hf"}
    assert t["latency"]["verdict"] == "MISS" and t["latency"]["against"] == "int4:hf"  # the fastest
    assert t["latency"]["ratio"] == pytest.approx(1.2)
    assert t["quality"] == {"verdict": "PASS", "share_on_best": 1.0, "best": "fp32:hf"}
    md = tab.format_markdown(out)
    assert "PASS (0.5× fp32:hf)" in md and "MISS (1.2× int4:hf)" in md and "100 % on fp32:hf" in md
    assert "| mixed | latency | 10 | 0.8 | 120 | 240 | 0.9 | int4:hf 50 %, fp32:hf 50 % | 0.8 |" in md
    assert "from usage.energy_joules; energy source: estimated." in md


def test_targets_say_why_they_cannot_be_judged(tab: ModuleType) -> None:
    servers = _servers()
    with_budget = tab.compare(servers, reference="fp32:hf", budget=True)["targets"]
    assert with_budget["quality"]["verdict"] == "n/a" and "budget" in with_budget["quality"]["why"]
    servers["mixed"]["per_objective"]["energy"]["j_per_token"] = None  # a server without per-request energy
    assert tab.compare(servers, "fp32:hf", False)["targets"]["energy"]["verdict"] == "n/a"
    singles_only = {k: v for k, v in _servers().items() if k != "mixed"}
    out = tab.compare(singles_only, "fp32:hf", False)
    assert {t["verdict"] for t in out["targets"].values()} == {"n/a"}
    for s in singles_only.values():
        s["variants"] = []
    assert tab.compare(singles_only, "fp32:hf", False)["quality"] == {}
