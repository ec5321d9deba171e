"""bench/serving.py's refusal rule (in bench/_serving_report.py): a row whose sides did not all decode the
fixed token count is never reported; the rows it does report carry ratios to vLLM offline."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "bench" / "_serving_report.py"


@pytest.fixture(scope="module")
def bench() -> ModuleType:
    # bench/ is scripts, not a package: load the file itself (it imports only the stdlib).
    spec = importlib.util.spec_from_file_location("bench_serving_report", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run(per_request: list[int], seconds: float) -> dict[str, Any]:
    return {"per_request": per_request, "seconds": seconds, "load_before": [0, 0, 0], "load_after": [0, 0, 0]}


def test_check_row_accepts_equal_fixed_counts(bench: ModuleType) -> None:
    cells = {"vllm-offline": run([64, 64], 2.0), "effllm-vllm": run([64, 64], 3.0)}
    assert bench.check_row(cells, 64, 2) is None


@pytest.mark.parametrize(
    ("ours", "why"),
    [
        ([64, 2], "effllm-vllm decoded [2] tokens per request, not 64"),  # one request stopped at EOS
        ([64], "effllm-vllm finished 1 of 2 requests"),
        ([65, 63], "effllm-vllm decoded [63, 65] tokens per request"),  # same total, wrong per request
    ],
)
def test_check_row_refuses_mismatched_counts(bench: ModuleType, ours: list[int], why: str) -> None:
    cells = {"vllm-offline": run([64, 64], 2.0), "effllm-vllm": run(ours, 3.0)}
    reason = bench.check_row(cells, 64, 2)
    assert reason is not None and why in reason


def test_build_rows_refuses_a_row_and_reports_the_others(bench: ModuleType) -> None:
    def side(c1: list[int], c8: list[int], s: float) -> dict[str, Any]:
        return {"levels": {"1": {"runs": [run(c1, s)]}, "8": {"runs": [run(c8, s)]}}}

    results = {
        ("fp32", "vllm-offline"): side([8] * 2, [8] * 16, 1.0),
        ("fp32", "effllm-vllm"): side([8] * 2, [8] * 15 + [3], 2.0),  # c=8: one request ended early
        ("int4", "effllm-hf"): side([8] * 2, [8] * 16, 0.5),
    }
    rows, refused = bench.build_rows(results, [1, 8], 8, 2)
    assert [(r["precision"], r["concurrency"]) for r in refused] == [("fp32", 8)]
    assert "effllm-vllm decoded [3]" in refused[0]["reason"]
    fp32_c1 = next(r for r in rows if r["precision"] == "fp32" and r["concurrency"] == 1)
    assert fp32_c1["sides"]["effllm-vllm"]["ratio"] == pytest.approx(0.5)  # 16 tok / 2 s vs 16 tok / 1 s
    assert not any(r["precision"] == "fp32" and r["concurrency"] == 8 for r in rows)
    table = bench.format_table(rows, [1, 8], 8)
    assert "refused" in table  # the refused cell is named, not filled with a number


def test_int4_ratio_is_to_vllm_offline_bf16(bench: ModuleType) -> None:
    results = {
        ("bf16", "vllm-offline"): {"levels": {"1": {"runs": [run([8, 8], 1.0)]}}},
        ("int4", "effllm-hf"): {"levels": {"1": {"runs": [run([8, 8], 0.5)]}}},
    }
    rows, refused = bench.build_rows(results, [1], 8, 2)
    int4 = next(r for r in rows if r["precision"] == "int4")
    assert not refused and int4["baseline"] == "vllm-offline bf16"
    assert int4["sides"]["effllm-hf"]["ratio"] == pytest.approx(2.0)
