"""The bench compares like with like: it refuses a ratio between runs that trained on different tokens, and
a real (tiny) bench run gives both sides the very same tokens."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from ..tuner.tiny import save_tiny_llama

BENCH = Path(__file__).resolve().parents[2] / "bench"


@pytest.fixture(scope="module")
def bench() -> ModuleType:
    # bench/ is scripts, not a package: load bench/tuning.py with its folder importable (the harness)
    sys.path.insert(0, str(BENCH))
    try:
        spec = importlib.util.spec_from_file_location("bench_tuning", BENCH / "tuning.py")
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules["bench_tuning"] = module  # dataclasses resolve their module
        spec.loader.exec_module(module)
        return module
    finally:
        sys.path.remove(str(BENCH))


def _run(tokens: int, target_tokens: int, tokens_per_s: float, loss: float) -> dict[str, Any]:
    return {
        "tokens": tokens,
        "target_tokens": target_tokens,
        "tokens_per_s": tokens_per_s,
        "step_latency_p50_s": 1000 / tokens_per_s,
        "first_step_s": 1.0,
        "peak_rss_gb": 2.0,
        "energy": {"joules": 100.0, "source": "estimated"},
        "train_loss": [2.0, loss],
        "eval_after": {"loss": 1.0, "exact_match": 0.5},
    }


def test_compare_refuses_runs_with_different_token_counts(bench: ModuleType) -> None:
    ours = _run(1000, 300, 300.0, 1.0)
    with pytest.raises(bench.MismatchedRuns, match="tokens differ: 1000 vs 1008"):
        bench.compare(ours, _run(1008, 300, 200.0, 1.0))
    with pytest.raises(bench.MismatchedRuns, match="target_tokens differ"):
        bench.compare(ours, _run(1000, 299, 200.0, 1.0))
    c = bench.compare(ours, _run(1000, 300, 200.0, 1.1))
    assert c.tokens_per_s == pytest.approx(1.5) and c.step_latency_p50 == pytest.approx(2 / 3)
    assert c.final_loss_delta == pytest.approx(-0.1 / 1.1)


def test_table_prints_refusal_not_a_ratio(bench: ModuleType) -> None:
    report = {
        "machine": {"cpu_model": "Test CPU", "cpu_flags": [], "cpu_count": 2, "load_avg": (0.1, 0.2, 0.3)},
        "task": "json_extract",
        "steps": 2,
        "threads": 2,
        "batch_size": 8,
        "max_length": 96,
        "n_eval": 64,
        "methods": [
            {"method": "lora", "ours": _run(1000, 300, 300.0, 1.0), "hf": _run(1000, 300, 200.0, 1.0)},
            {"method": "dora", "ours": _run(1000, 300, 300.0, 1.0), "hf": _run(990, 300, 200.0, 1.0)},
        ],
    }
    text = bench.table(report)
    assert "Test CPU" in text and "load average 0.10 0.20 0.30" in text
    assert "| lora ours/theirs | | **1.50x**" in text
    assert (
        "| dora ours/theirs | refused: tokens differ: 1000 vs 990" in text
        and "dora ours/theirs | |" not in text
    )


@pytest.mark.model
def test_a_tiny_bench_gives_both_sides_the_same_tokens(bench: ModuleType, tmp_path: Path) -> None:
    """Our loop and PEFT + HF Trainer each in its own process, on a tiny random Llama: same tokens, target
    tokens and first-step loss (same batches, same init), so the ratio is printed."""
    model = save_tiny_llama(tmp_path / "tiny")
    out = tmp_path / "bench.json"
    overrides = [f"model={model}", "n_train=16", "n_eval=4", "eval_max_new_tokens=2", "max_length=128"]
    assert (
        bench.main(
            steps=2,
            task="reverse_words",
            methods=["lora"],
            hf_trainer=True,
            out=str(out),
            overrides=overrides,
        )
        == 0
    )
    report = json.loads(out.read_text())
    entry = report["methods"][0]
    ours, theirs = entry["ours"], entry["hf"]
    assert ours["tokens"] == theirs["tokens"] > 0 and ours["target_tokens"] == theirs["target_tokens"] > 0
    assert ours["train_loss"][0] == pytest.approx(theirs["train_loss"][0], rel=1e-4)
    assert ours["peak_rss_gb"] > 0.1 and theirs["peak_rss_gb"] > 0.1
    assert ours["energy"]["source"] == theirs["energy"]["source"]
    assert report["base"]["eval"]["n"] == 4 and ours["eval_after"]["n"] == 4
    assert "| lora ours/theirs | |" in report["table"]
