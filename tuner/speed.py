"""The training step's speed-ups and the clock that says where a step's time goes.

Packing: the examples of one micro-batch (the same ones, in the same order the padded path sees) are laid
first-fit-decreasing into rows of `capacity` tokens. position_ids restart at 0 for every example and no 2D
attention mask is passed, so transformers builds a block-diagonal causal mask from the position resets
(masking_utils.find_packed_sequence_indices): no token attends across an example boundary, and rotary
positions are those of the example alone. The first label of each packed example is IGNORE, as position 0
of a padded row never is a target, so the next-token loss never crosses a boundary.
Logits on targets: lm_head ([T, 576] x [576, V=49152] per row) only at positions whose next token is a
target, via transformers' `logits_to_keep` index tensor; the loss is the same sum over the same tokens.
Invariant: `pack(examples)` and `collate(examples)` carry the same targets, in the same count; the padding
slots of either are counted in `Layout`, never as tokens trained on.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch

from ..telemetry.machine import machine
from . import data

PHASES = ("collate", "forward", "backward", "optimizer")


@dataclass(frozen=True)
class Layout:
    """Token slots of one batch: `real` hold an example's token, the rest are padding."""

    real: int
    slots: int


def cpu_has_bf16() -> bool:
    """True when the CPU has native BF16 arithmetic (AVX512-BF16 or AMX-BF16) per /proc/cpuinfo's flags."""
    return bool(machine().cpu_bf16)


def autocast_dtype(setting: str, device: torch.device) -> torch.dtype | None:
    """bf16 for "bf16", None for "off"; "auto": bf16 where the hardware computes in it natively."""
    if setting == "bf16":
        return torch.bfloat16
    if setting == "off":
        return None
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else None
    return torch.bfloat16 if cpu_has_bf16() else None


def autocast(dtype: torch.dtype | None, device: torch.device) -> contextlib.AbstractContextManager[object]:
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def fp32_master_weights(model: torch.nn.Module) -> int:
    """Cast trainable parameters held in a low precision to fp32 (the optimizer updates those); returns how
    many were cast. Frozen weights keep their dtype: under autocast they are read in bf16 anyway."""
    cast = 0
    for p in model.parameters():
        if p.requires_grad and p.dtype != torch.float32:
            p.data = p.data.float()
            cast += 1
    return cast


def pack(
    batch: Sequence[data.Encoded], pad_id: int, capacity: int, device: torch.device
) -> tuple[dict[str, torch.Tensor], Layout]:
    """Examples -> rows of at most `capacity` tokens. input_ids/labels/position_ids: [R, W], W = longest row.

    The padding at a row's end gets positions 0.. of its own, so it is one more block that nothing else
    attends to (and whose labels are IGNORE)."""
    rows: list[list[data.Encoded]] = []
    used: list[int] = []
    for e in sorted(batch, key=lambda e: -len(e.input_ids)):  # first-fit decreasing
        n = len(e.input_ids)
        slot = next((i for i, u in enumerate(used) if u + n <= capacity), None)
        if slot is None:
            rows.append([e])
            used.append(n)
        else:
            rows[slot].append(e)
            used[slot] += n
    width = max(used)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), data.IGNORE, dtype=torch.long)
    positions = torch.zeros((len(rows), width), dtype=torch.long)
    for r, row in enumerate(rows):
        at = 0
        for e in row:
            n = len(e.input_ids)
            ids[r, at : at + n] = torch.tensor(e.input_ids)
            labels[r, at + 1 : at + n] = torch.tensor(e.labels[1:])  # position 0 is never a target
            positions[r, at : at + n] = torch.arange(n)
            at += n
        positions[r, at:] = torch.arange(width - at)
    tensors = {"input_ids": ids, "labels": labels, "position_ids": positions}
    return {k: v.to(device) for k, v in tensors.items()}, Layout(sum(used), len(rows) * width)


def target_positions(labels: torch.Tensor) -> torch.Tensor:
    """Positions t whose next token t+1 is a target in any row: [K] int64, ascending. labels: [B, T]."""
    return (labels[:, 1:] != data.IGNORE).any(dim=0).nonzero().squeeze(1)


@dataclass
class StepClock:
    """Wall time per phase of one optimizer step; on CUDA each phase ends with a synchronize, so the
    phase's kernels are charged to it rather than to the next one."""

    cuda: bool = False
    seconds: dict[str, float] = field(default_factory=lambda: dict.fromkeys(PHASES, 0.0))

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        t0 = time.perf_counter()
        try:
            yield
        finally:
            if self.cuda:
                torch.cuda.synchronize()
            self.seconds[name] += time.perf_counter() - t0


def compile_model(model: torch.nn.Module) -> torch.nn.Module:
    """The training forward through torch.compile. Shapes vary (batch width, number of target positions),
    so dynamic shapes: one warm-up compile, not one per width. Parameters are shared with `model`."""
    return torch.compile(model, dynamic=True)  # type: ignore[return-value]
