"""Stacked LoRA for the hf engine: all resident LoRA/rsLoRA adapters in one tensor per target Linear,
applied to every row of a forward at once with gathered, batched matmuls (the S-LoRA/Punica idea in
plain torch ops), so a decode step over 32 distinct adapters costs about what one costs.

Each target nn.Linear gets a forward hook (installed once, the first time an adapter targets it) that
adds `scale[slot] * ((x @ A[slot]^T) @ B[slot]^T)` for each row's slot. Storage per target module:
A [slots, r_max, in] and B [slots, out, r_max], zero-padded past each adapter's rank, so one bmm serves
mixed ranks. A load reads the adapter's safetensors once (safe_open, mmap) and copies the tensors into a
free slot: no PEFT model surgery. The math follows PEFT's LoRA forward exactly (fp32 adapter weights, as
PEFT's autocast keeps them; input cast to fp32; base output + delta, cast back to the base's dtype), so
greedy tokens equal PEFT's one adapter at a time. Adapters this path cannot express (DoRA, rank or alpha
patterns, LoRA bias, modules_to_save, non-Linear targets) are left to PEFT (`read_lora` returns None).

Invariant: slot 0 is all zeros (base rows); a free slot and every slot's rows past its rank are zero;
only the engine's worker thread writes the storage or sets the rows (`rows()`), and never during a forward.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from .base import EffllmError

LORA_DTYPE = torch.float32  # PEFT upcasts bf16/fp16 adapter weights to fp32 (autocast_adapter_dtype)
_PREFIX = "base_model.model."
# adapter_config.json keys that must be falsy for the stacked path (anything else goes to PEFT)
_PEFT_ONLY = (
    "use_dora",
    "rank_pattern",
    "alpha_pattern",
    "lora_bias",
    "modules_to_save",
    "target_parameters",
    "fan_in_fan_out",
    "use_qalora",
    "trainable_token_indices",
    "alora_invocation_tokens",
)


@dataclass(frozen=True)
class LoadedLora:
    """One adapter read from disk and checked against the model, not yet placed in a slot."""

    rank: int
    scale: float  # alpha / r, or alpha / sqrt(r) for rsLoRA (PEFT's scaling)
    weights: dict[str, tuple[torch.Tensor, torch.Tensor]]  # module -> (A [r, in], B [out, r])


def read_lora(path: Path, linears: dict[str, nn.Linear]) -> LoadedLora | None:
    """Read and check a PEFT LoRA folder for the stacked path; None when only PEFT can serve it."""
    from safetensors import safe_open

    try:
        config = json.loads((path / "adapter_config.json").read_text())
    except (OSError, ValueError) as exc:
        raise EffllmError("failed_precondition", f"adapter_config.json: cannot read it ({exc})") from exc
    if not isinstance(config, dict) or config.get("peft_type", "LORA") != "LORA":
        return None
    if any(config.get(k) for k in _PEFT_ONLY) or config.get("bias", "none") != "none":
        return None
    rank, alpha = config.get("r"), config.get("lora_alpha", config.get("r"))
    if not isinstance(rank, int) or rank < 1 or not isinstance(alpha, (int, float)) or alpha <= 0:
        raise EffllmError("failed_precondition", f"adapter_config.json: r={rank!r}, lora_alpha={alpha!r}")
    scale = alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank
    file = path / "adapter_model.safetensors"
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    try:
        with safe_open(str(file), framework="pt", device="cpu") as f:
            for key in f.keys():  # noqa: SIM118 (safe_open is not a mapping)
                if not (key.startswith(_PREFIX) and key.endswith((".lora_A.weight", ".lora_B.weight"))):
                    return None  # embeddings, magnitudes, biases...: PEFT's business
                module, part = key[len(_PREFIX) : -len(".weight")].rsplit(".", 1)
                if module not in linears:
                    return None  # a target that is not a plain Linear of this model
                pairs.setdefault(module, {})[part] = f.get_tensor(key)
    except EffllmError:
        raise
    except Exception as exc:  # truncated or foreign file: the registry should have refused it already
        raise EffllmError(
            "failed_precondition", f"adapter_model.safetensors: cannot read it ({exc})"
        ) from exc
    weights = {}
    for module, parts in pairs.items():
        lin = linears[module]
        a, b = parts.get("lora_A"), parts.get("lora_B")
        if a is None or b is None:
            raise EffllmError("failed_precondition", f"adapter weights: {module} lacks lora_A or lora_B")
        if tuple(a.shape) != (rank, lin.in_features) or tuple(b.shape) != (lin.out_features, rank):
            raise EffllmError(
                "failed_precondition",
                f"adapter weights: {module} has A {tuple(a.shape)}, B {tuple(b.shape)}; "
                f"expected ({rank}, {lin.in_features}) and ({lin.out_features}, {rank})",
            )
        if not (a.is_floating_point() and b.is_floating_point()):
            raise EffllmError("failed_precondition", f"adapter weights: {module} is not floating point")
        weights[module] = (a, b)
    if not weights:
        raise EffllmError("failed_precondition", "adapter weights: no lora_A/lora_B tensors")
    return LoadedLora(rank, float(scale), weights)


class _Stack:
    """The stacked adapters of one Linear, and the forward hook that applies them."""

    def __init__(self, owner: StackedLora, linear: nn.Linear, slots: int, rank: int, device: Any) -> None:
        self.owner = owner
        self.a = torch.zeros(slots, rank, linear.in_features, dtype=LORA_DTYPE, device=device)
        self.b = torch.zeros(slots, linear.out_features, rank, dtype=LORA_DTYPE, device=device)
        self.used: set[int] = set()  # slots with non-zero weights here
        self.handle = linear.register_forward_hook(self)

    def resize(self, slots: int, rank: int) -> None:
        a = self.a.new_zeros(slots, rank, self.a.shape[2])
        b = self.b.new_zeros(slots, self.b.shape[1], rank)
        n, r = min(slots, self.a.shape[0]), min(rank, self.a.shape[1])
        a[:n, :r] = self.a[:n, :r]
        b[:n, :, :r] = self.b[:n, :, :r]
        self.a, self.b = a, b

    def __call__(self, module: nn.Module, args: tuple[Any, ...], out: torch.Tensor) -> torch.Tensor | None:
        o = self.owner
        if o.index is None or self.used.isdisjoint(o.row_slots):
            return None
        x = args[0].to(LORA_DTYPE)
        if o.single:  # every row on one adapter (prefill, uniform decode): PEFT's own two Linears
            s = o.single
            r = o.ranks[s]
            delta = F.linear(F.linear(x, self.a[s, :r]), self.b[s, :, :r]) * o.scales[s]
        else:  # x [B, T, in] -> [B, T, r_max] -> [B, T, out], each row with its own slot's A and B
            idx = o.index
            assert o.row_scale is not None  # set with index
            x3 = x.reshape(idx.shape[0], -1, x.shape[-1])
            xa = torch.bmm(x3, self.a.index_select(0, idx).transpose(1, 2))
            delta = torch.bmm(xa, self.b.index_select(0, idx).transpose(1, 2)) * o.row_scale
            delta = delta.reshape(*x.shape[:-1], delta.shape[-1])
        return (out + delta).to(out.dtype)


class StackedLora:
    """Slots for the resident stackable adapters of one model; slot 0 is the base (zeros)."""

    def __init__(self, model: nn.Module, device: Any, slots: int = 16) -> None:
        self.device = torch.device(device)
        self.linears = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear)}
        self.capacity = max(2, slots + 1)
        self.rank = 0  # r_max over resident adapters; storage grows to it
        self.stacks: dict[str, _Stack] = {}
        # bumped after every change of the storage's shapes (a new target Linear, more slots, a larger
        # rank), once the change is complete: hf_compiled's graphs are valid for one value of it
        self.shapes = 0
        self.slots: dict[str, int] = {}  # adapter key -> slot
        self.ranks = [0] * self.capacity
        self.scales = [0.0] * self.capacity
        self.scale = torch.zeros(self.capacity, dtype=LORA_DTYPE, device=self.device)
        # the rows of the forward in progress (set by rows()): None = no adapter math at all
        self.index: torch.Tensor | None = None  # [B] slot per row
        self.row_scale: torch.Tensor | None = None  # [B, 1, 1]
        self.row_slots: frozenset[int] = frozenset()
        self.single = 0  # > 0: every row is on this one slot

    def __contains__(self, key: str) -> bool:
        return key in self.slots

    def add(self, key: str, lora: LoadedLora) -> None:
        if key in self.slots:
            return
        free = next((s for s in range(1, self.capacity) if s not in self.slots.values()), None)
        if free is None:
            free = self.capacity
            self._grow(self.capacity * 2, self.rank)
        if lora.rank > self.rank:
            self._grow(self.capacity, lora.rank)
        for module in lora.weights:
            if module not in self.stacks:
                self.stacks[module] = _Stack(
                    self, self.linears[module], self.capacity, self.rank, self.device
                )
                self.shapes += 1
        for module, (a, b) in lora.weights.items():
            stack = self.stacks[module]
            stack.a[free, : lora.rank].copy_(a)
            stack.b[free, :, : lora.rank].copy_(b)
            stack.used.add(free)
        self.ranks[free], self.scales[free] = lora.rank, lora.scale
        self.scale[free] = lora.scale
        self.slots[key] = free

    def remove(self, key: str) -> None:
        slot = self.slots.pop(key, None)
        if slot is None:
            return
        for stack in self.stacks.values():
            if slot in stack.used:
                stack.a[slot].zero_()
                stack.b[slot].zero_()
                stack.used.discard(slot)
        self.ranks[slot], self.scales[slot] = 0, 0.0
        self.scale[slot] = 0.0

    def slot(self, key: str) -> int:
        return self.slots[key] if key else 0

    @contextmanager
    def rows(self, slots: list[int]) -> Iterator[None]:
        """Within the block, forwards apply adapter `slots[i]` to batch row i (0 = base)."""
        distinct = frozenset(slots)
        if distinct and distinct != {0}:
            self.row_slots = distinct
            if len(distinct) == 1:
                self.single = slots[0]
            index = torch.tensor(slots, dtype=torch.long, device=self.device)
            self.index = index
            self.row_scale = self.scale.index_select(0, index).view(-1, 1, 1)
        try:
            yield
        finally:
            self.index, self.row_scale, self.row_slots, self.single = None, None, frozenset(), 0

    def _grow(self, capacity: int, rank: int) -> None:
        for stack in self.stacks.values():
            stack.resize(capacity, rank)
        if capacity > self.capacity:
            extra = capacity - self.capacity
            self.ranks += [0] * extra
            self.scales += [0.0] * extra
            self.scale = torch.cat([self.scale, self.scale.new_zeros(extra)])
        self.capacity, self.rank = capacity, rank
        self.shapes += 1
