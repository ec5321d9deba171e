"""`effllm calibrate` on the real default model (hf engine, fp32, a few tokens): it stores a calibration
that the next `auto` resolution of `effllm serve` reads, and says so."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from effllm.cli.main import main


@pytest.mark.model
@pytest.mark.timeout(1200)
def test_calibrate_stores_what_auto_then_uses(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from effllm.common.model import resolve_model
    from effllm.server.engine_args import EngineArgs, resolve_auto

    model = resolve_model(None)  # from the real cache dir; the calibration goes to an empty one
    monkeypatch.setenv("EFFLLM_CACHE", str(tmp_path))
    flags = ["--model", str(model.path), "--device", "cpu", "--max-context", "256"]
    measure = ["--configs", "fp32:hf,int4:vllm", "--max-new-tokens", "4", "--max-concurrency", "2"]
    rc = main(["calibrate", *flags, *measure, "--requests", "2", "--repeats", "2"])
    assert rc == 0
    (stored,) = (tmp_path / "calibration").glob("*.json")
    rows = {
        r["config"]["precision"] + ":" + r["config"]["engine"]: r
        for r in json.loads(stored.read_text())["rows"]
    }
    assert rows["int4:vllm"]["skipped"] == "vLLM's CPU backend has no int4"
    assert rows["fp32:hf"]["c1"]["samples"] == rows["fp32:hf"]["cmax"]["samples"] == 2
    assert rows["fp32:hf"]["c1"]["median"] > 0

    args = EngineArgs(model=str(model.path), device="cpu", max_context=256)  # what `flags` set
    choice = resolve_auto(args, model, "cpu")
    assert (choice.precision, choice.engine, choice.compile_decode) == ("fp32", "hf", False)
    assert choice.reason.startswith("fp32 hf: calibrated ") and "at c=2" in choice.reason
