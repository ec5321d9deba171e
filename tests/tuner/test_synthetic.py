"""Synthetic adapters: real PEFT folders on the real base, non-zero B, one per seed, the asked method."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from safetensors.torch import load_file

from effllm.common.model import resolve_model
from effllm.tuner.synthetic import make_adapter

pytestmark = pytest.mark.model  # loads the real model (deselected by scripts/test.sh --fast)


def test_make_adapter_writes_a_peft_folder_that_changes_the_model(tmp_path: Path) -> None:
    base = resolve_model(None).path
    a = make_adapter(base, tmp_path / "a", method="dora", rank=4, seed=1, manifest={"name": "a"})
    b = make_adapter(base, tmp_path / "b", method="dora", rank=4, seed=2)
    config = json.loads((a / "adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"], config["use_dora"]) == (4, 8, True)
    assert sorted(config["target_modules"]) == ["q_proj", "v_proj"]
    assert json.loads((a / "manifest.json").read_text()) == {"name": "a"}
    assert not (b / "manifest.json").exists()
    wa, wb = load_file(a / "adapter_model.safetensors"), load_file(b / "adapter_model.safetensors")
    lora_b = [k for k in wa if "lora_B" in k]
    assert lora_b and all(wa[k].abs().sum() > 0 for k in lora_b)  # B != 0: the adapter changes the output
    assert any(not wa[k].equal(wb[k]) for k in lora_b)  # another seed, another adapter
