"""hf_lora's stacked adapters on a toy model (milliseconds): each row gets its own adapter's delta exactly as
PEFT's formula gives it, base rows stay bit-exact, slots grow in number and rank, and a freed slot is zero;
read_lora hands what it cannot stack to PEFT and refuses broken files with a clear status."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from effllm.server.engines.base import EffllmError
from effllm.server.engines.hf_lora import LoadedLora, StackedLora, read_lora


class Toy(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.q_proj = nn.Linear(12, 10, bias=False)
        self.v_proj = nn.Linear(12, 6, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.q_proj(x), self.v_proj(x)], dim=-1)


def lora(rank: int, seed: int, scale: float, modules: tuple[str, ...] = ("q_proj", "v_proj")) -> LoadedLora:
    g = torch.Generator().manual_seed(seed)
    shapes = {"q_proj": (10, 12), "v_proj": (6, 12)}
    weights = {
        m: (torch.randn(rank, shapes[m][1], generator=g), torch.randn(shapes[m][0], rank, generator=g))
        for m in modules
    }
    return LoadedLora(rank, scale, weights)


def expected(model: Toy, x: torch.Tensor, adapter: LoadedLora | None) -> torch.Tensor:
    """PEFT's LoRA forward for one row: base + lora_B(lora_A(x)) * scaling."""
    outs = []
    for name in ("q_proj", "v_proj"):
        y = getattr(model, name)(x)
        if adapter is not None and name in adapter.weights:
            a, b = adapter.weights[name]
            y = y + nn.functional.linear(nn.functional.linear(x, a), b) * adapter.scale
        outs.append(y)
    return torch.cat(outs, dim=-1)


def test_each_row_gets_its_own_adapter_and_base_rows_stay_exact() -> None:
    torch.manual_seed(0)
    model = Toy()
    stack = StackedLora(model, "cpu", slots=2)
    adapters = {
        "a": lora(8, 1, 2.0),
        "b": lora(16, 2, 32 / math.sqrt(16)),  # a higher rank after the first: storage grows in rank
        "c": lora(4, 3, 0.5, ("q_proj",)),  # third adapter: over the 2 slots, storage grows in number
    }
    for key, adapter in adapters.items():
        stack.add(key, adapter)
    assert stack.rank == 16 and stack.capacity >= 4
    keys = ["", "a", "b", "c", "a", ""]
    x = torch.randn(len(keys), 3, 12)
    with torch.no_grad():
        plain = model(x)
        with stack.rows([stack.slot(k) for k in keys]):
            mixed = model(x)
        with stack.rows([stack.slot("b")]):
            alone = model(x[2:3])
    for i, key in enumerate(keys):
        want = expected(model, x[i : i + 1], adapters.get(key)) if key else plain[i : i + 1]
        if key:
            torch.testing.assert_close(mixed[i : i + 1], want, rtol=1e-5, atol=1e-5)
        else:
            assert torch.equal(mixed[i : i + 1], plain[i : i + 1])  # base rows: bit-exact
    torch.testing.assert_close(alone, expected(model, x[2:3], adapters["b"]), rtol=1e-5, atol=1e-5)
    assert torch.equal(model(x), plain)  # outside rows(): no adapter math at all


def test_removed_slot_is_zero_and_reused() -> None:
    model = Toy()
    stack = StackedLora(model, "cpu", slots=2)
    stack.add("a", lora(8, 1, 2.0))
    slot = stack.slot("a")
    stack.remove("a")
    assert all(not s.a[slot].any() and not s.b[slot].any() for s in stack.stacks.values())
    stack.add("c", lora(4, 3, 0.5, ("q_proj",)))  # reuses the slot; v_proj rows stay zero
    assert stack.slot("c") == slot and not stack.stacks["v_proj"].a[slot].any()
    x = torch.randn(2, 1, 12)
    with torch.no_grad(), stack.rows([slot, 0]):
        out = model(x)
    torch.testing.assert_close(out[:1], expected(model, x[:1], lora(4, 3, 0.5, ("q_proj",))))


def _write(folder: Path, config: dict[str, object], tensors: dict[str, torch.Tensor]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "adapter_config.json").write_text(json.dumps(config))
    save_file(tensors, str(folder / "adapter_model.safetensors"))
    return folder


def test_read_lora_stacks_lora_and_rslora_hands_variants_to_peft_and_refuses_bad_files(
    tmp_path: Path,
) -> None:
    linears = {n: m for n, m in Toy().named_modules() if isinstance(m, nn.Linear)}
    good = {
        "base_model.model.q_proj.lora_A.weight": torch.randn(4, 12),
        "base_model.model.q_proj.lora_B.weight": torch.randn(10, 4),
    }
    cfg = {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "bias": "none"}
    loaded = read_lora(_write(tmp_path / "lora", cfg, good), linears)
    assert loaded is not None and loaded.rank == 4 and loaded.scale == 2.0
    rs = read_lora(_write(tmp_path / "rs", {**cfg, "use_rslora": True}, good), linears)
    assert rs is not None and rs.scale == 4.0
    assert read_lora(_write(tmp_path / "dora", {**cfg, "use_dora": True}, good), linears) is None
    assert read_lora(_write(tmp_path / "pat", {**cfg, "rank_pattern": {"q_proj": 2}}, good), linears) is None
    embed = {**good, "base_model.model.embed.lora_embedding_A": torch.randn(4, 3)}
    assert read_lora(_write(tmp_path / "emb", cfg, embed), linears) is None
    wrong = {**good, "base_model.model.q_proj.lora_B.weight": torch.randn(11, 4)}
    with pytest.raises(EffllmError, match=r"q_proj has A \(4, 12\), B \(11, 4\)") as err:
        read_lora(_write(tmp_path / "wrong", cfg, wrong), linears)
    assert err.value.code == "failed_precondition"
    half = {"base_model.model.q_proj.lora_A.weight": torch.randn(4, 12)}
    with pytest.raises(EffllmError, match="lacks lora_A or lora_B"):
        read_lora(_write(tmp_path / "half", cfg, half), linears)
    trunc = _write(tmp_path / "trunc", cfg, good) / "adapter_model.safetensors"
    trunc.write_bytes(trunc.read_bytes()[:-20])
    with pytest.raises(EffllmError, match=r"adapter_model\.safetensors: cannot read it"):
        read_lora(trunc.parent, linears)
