"""int4 weights on CPU for the hf engine, and weight bytes measured from the tensors the model really holds.

Why torchao's PrototypeInt4WeightOnlyConfig (Int4OpaqueTensor, tinygemm CPU kernel, bf16 activations):
- it runs at about bf16 speed on CPU, while bitsandbytes NF4 (which also works with PEFT) is ~3x slower
  here, and torchao's standard int4 configs fail on CPU;
- PEFT wraps its Linear layers as TorchaoLoraLinear, so LoRA/rsLoRA adapters (mixed batches included)
  run on top of the quantized base unmerged. DoRA does not: it needs the dequantized base weight and
  Int4OpaqueTensor implements no `dequantize`, so at int4 the engine offers lora and rslora only.
- group size 64: SmolLM2's hidden size (576) is not a multiple of 128, and a 128 group would silently
  leave most Linear layers in bf16.

The tied embedding: quantizing lm_head unties it and would leave a bf16 embedding (a fifth of the model)
beside it, which puts the model at ~0.49 of its bf16 size. `TiedInt4Embedding` instead looks rows up
in lm_head's packed int4 weight, so the pair is stored once, in int4. The CPU pack layout is learned
from `_convert_weight_to_int4pack_for_cpu` itself at start (it is a fixed permutation of nibbles per
block of rows) and the result is checked against the kernel's own dequantization before it is used.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import nn

log = logging.getLogger(__name__)

INT4_GROUP_SIZE = 64
_PROBE_ROWS = 256  # the pack repeats per block of rows (32 or 64); 256 rows show the period
_PERIOD = 128


def tensor_bytes(t: torch.Tensor) -> int:
    """Bytes a tensor holds; for a tensor subclass (torchao), the sum over its inner tensors; for a
    bitsandbytes 4-bit parameter, its packed bytes plus the quantization state (absmax, nested too)."""
    flatten = getattr(type(t), "__tensor_flatten__", None)
    if flatten is not None and type(t) not in (torch.Tensor, nn.Parameter):
        names, _ = t.__tensor_flatten__()  # type: ignore[attr-defined]
        return sum(tensor_bytes(getattr(t, n)) for n in names)
    return int(t.numel() * t.element_size()) + _quant_state_bytes(getattr(t, "quant_state", None))


def _quant_state_bytes(state: Any) -> int:
    if state is None:
        return 0
    own = [getattr(state, n, None) for n in ("absmax", "code", "offset")]
    return sum(int(x.numel() * x.element_size()) for x in own if isinstance(x, torch.Tensor)) + (
        _quant_state_bytes(getattr(state, "state2", None))
    )


def weight_bytes(model: nn.Module) -> int:
    """Bytes of every parameter and buffer, each storage counted once (tied weights are one tensor)."""
    seen: set[int] = set()
    total = 0
    for t in [*model.parameters(), *model.buffers()]:
        if id(t) in seen:
            continue
        seen.add(id(t))
        total += tensor_bytes(t)
    return total


def quantize_int4(model: Any, group_size: int = INT4_GROUP_SIZE) -> None:
    """Quantize every Linear (lm_head included) to int4 in place, then re-tie the input embedding."""
    from torchao.prototype.quantization.int4 import PrototypeInt4WeightOnlyConfig
    from torchao.quantization import quantize_

    embed = model.get_input_embeddings()
    head = model.get_output_embeddings()
    tied = head is not None and embed is not None and head.weight is embed.weight
    quantize_(model, PrototypeInt4WeightOnlyConfig(group_size=group_size, set_inductor_config=False))
    if tied:
        model.set_input_embeddings(TiedInt4Embedding(head, embed.padding_idx))
    else:
        log.warning("int4: the input embedding is not tied to lm_head; it stays at %s", embed.weight.dtype)


def _learn_pack_layout(k: int) -> torch.Tensor:
    """Nibble position of each (row, col) of a [_PERIOD, k] block in the CPU int4 pack, as int32."""
    n = _PROBE_ROWS
    idx = torch.arange(n * k, dtype=torch.int64).reshape(n, k)
    source = torch.zeros(n * k, dtype=torch.int64)  # for each packed nibble: the (row * k + col) it holds
    for p in range((n * k - 1).bit_length() // 4 + 1):
        vals = ((idx >> (4 * p)) & 0xF).to(torch.int32)
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(vals, 1).flatten().to(torch.int64)
        nibbles = torch.stack([packed & 0xF, packed >> 4], 1).flatten()  # low nibble first
        source |= nibbles << (4 * p)
    position = torch.empty_like(source)
    position[source] = torch.arange(n * k)
    pos = position.reshape(n, k)
    if not torch.equal(pos[_PERIOD:], pos[:_PERIOD] + _PERIOD * k):
        raise RuntimeError("int4 pack layout does not repeat every 128 rows")
    return pos[:_PERIOD].to(torch.int32)


class TiedInt4Embedding(nn.Module):
    """nn.Embedding whose table is lm_head's Int4OpaqueTensor: rows are unpacked and dequantized on lookup."""

    def __init__(self, head: nn.Module, padding_idx: int | None = None) -> None:
        super().__init__()
        self.head = [
            head
        ]  # a list: not a submodule, so lm_head's weight is neither re-registered nor counted twice
        weight: Any = head.weight
        self.num_embeddings, self.embedding_dim = int(weight.shape[0]), int(weight.shape[1])
        self.padding_idx = padding_idx
        if self.num_embeddings % _PERIOD:
            raise RuntimeError(f"int4 tied embedding needs a vocabulary that is a multiple of {_PERIOD}")
        self.register_buffer("layout", _learn_pack_layout(self.embedding_dim), persistent=False)
        self._check()

    @property
    def weight(self) -> Any:
        return self.head[0].weight

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        w = self.weight
        qdata = w.qdata.reshape(-1)  # [N * K / 2] uint8
        sz = w.scale_and_zero  # [K / group, N, 2]
        k = self.embedding_dim
        ids = input_ids.reshape(-1).to(torch.int64)
        block = (ids // _PERIOD) * (_PERIOD * k)
        layout: torch.Tensor = self.layout  # type: ignore[assignment]
        pos = layout[ids % _PERIOD].to(torch.int64) + block[:, None]  # [T, K] nibble positions
        byte = qdata[pos // 2].to(torch.int32)
        q = torch.where(pos % 2 == 0, byte & 0xF, byte >> 4).float()
        group = k // sz.shape[0]
        params = sz[:, ids, :].float().repeat_interleave(group, 0)  # [K, T, 2]
        scale, zero = params[..., 0].T, params[..., 1].T
        rows = ((q - 8.0) * scale + zero).to(sz.dtype)  # the tinygemm dequantization
        return rows.reshape(*input_ids.shape, k)

    def _check(self) -> None:
        """Rows must equal what the int4 matmul kernel itself uses: lm_head(I) = W^T exactly."""
        eye = torch.eye(self.embedding_dim, dtype=self.weight.scale_and_zero.dtype)
        ids = torch.cat([torch.arange(0, 300), torch.arange(self.num_embeddings - 300, self.num_embeddings)])
        with torch.no_grad():
            expected = self.head[0](eye).T[ids]
            got = self.forward(ids)
        if not torch.equal(got, expected):
            raise RuntimeError("int4 tied embedding: unpacked rows differ from the kernel's dequantization")

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, int4 tied to lm_head"
