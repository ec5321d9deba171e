"""The vLLM engine's adapter probe (issue 28): each module's LoRA update on a probe input, on real PEFT
adapters of the default model; no engine needed."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from effllm.common.model import resolve_model
from effllm.server.engines.lora_delta import DELTA_LIMIT, delta_problem, lora_scale, probe_input

from ...adaptertools import make_adapter

pytestmark = pytest.mark.model


@pytest.fixture(scope="module")
def good(tmp_path_factory: pytest.TempPathFactory) -> Path:
    targets = ("q_proj", "v_proj", "gate_proj", "down_proj")
    return make_adapter(
        resolve_model(None).path, tmp_path_factory.mktemp("d") / "good", rank=16, targets=targets
    )


def _rewrite(good: Path, dest: Path, edit) -> Path:  # type: ignore[no-untyped-def]
    folder = shutil.copytree(good, dest)
    weights = load_file(folder / "adapter_model.safetensors")
    save_file(edit(weights), folder / "adapter_model.safetensors")
    return folder


def test_a_real_adapter_passes_far_below_the_limit(good: Path) -> None:
    assert delta_problem(good, lora_scale("lora", 16, 32.0), torch.bfloat16) == ""
    # margin: the same adapter passes with a limit 100x lower than the one in force
    assert delta_problem(good, lora_scale("lora", 16, 32.0), torch.float32, DELTA_LIMIT / 100) == ""


def test_finite_weights_whose_product_overflows_are_not_finite(good: Path, tmp_path: Path) -> None:
    """The hardening case (every weight 1e30: the scan passes them) is refused, naming a module."""
    huge = _rewrite(good, tmp_path / "huge", lambda w: {k: v.fill_(1e30) for k, v in w.items()})
    problem = delta_problem(huge, 2.0, torch.bfloat16)
    assert "not finite" in problem and ("self_attn" in problem or "mlp" in problem), problem


def test_an_update_over_the_limit_is_refused_and_fp16_overflow_is_seen(good: Path, tmp_path: Path) -> None:
    def scale_one(weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        key = next(k for k in sorted(weights) if k.endswith("v_proj.lora_B.weight"))
        weights[key] *= 1e6  # finite everywhere, in every dtype's range as weights
        return weights

    big = _rewrite(good, tmp_path / "big", scale_one)
    problem = delta_problem(big, 2.0, torch.float32)
    assert "v_proj" in problem and "over the limit" in problem, problem
    assert "not finite" in delta_problem(big, 2.0, torch.float16, limit=float("inf"))  # > 65504 in fp16
    assert delta_problem(big, 2.0, torch.float32, limit=float("inf")) == ""


def test_the_probe_input_is_fixed_and_of_unit_rms() -> None:
    x = probe_input(576)
    assert torch.equal(x, probe_input(576))
    assert abs(float(x.pow(2).mean()) - 1.0) < 1e-5


def test_rslora_scale_is_peft_s() -> None:
    assert lora_scale("lora", 16, 32.0) == 2.0
    assert lora_scale("rslora", 16, 32.0) == 8.0
