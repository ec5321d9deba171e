"""The hf engine's decode steps behind one Protocol: a row, the `Decoder` a group of rows decodes on, and
the eager decoder (transformers' DynamicCache, left-padded). hf_compiled.CompiledDecoder is the other one
(a static KV cache and a torch.compile'd step, for the main group under HfConfig.compile_decode).

hf_batch owns the groups (one main group for base and stacked-LoRA rows, one per adapter only PEFT
serves), prefills a joining row alone on the eager path into a DynamicCache and hands it to its group's
decoder; from `join` to `leave` the decoder holds that row's KV and decodes one token per step for all of
its rows. Positions are per row (real tokens so far), so padding never changes what a row computes.
Invariant: a decoder's `rows` are exactly the rows whose KV it holds, in the order `decode` returns
their logits; it runs on the batch's worker thread only.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from .base import AdapterSpec, EffllmError, Sampling
from .hf_text import TextStream

# (group key, the group's rows, **model inputs) -> last-position logits [B, vocab] in fp32 (hf_batch)
Forward = Callable[..., torch.Tensor]


@dataclass(eq=False)
class Row:
    request_id: str
    prompt_ids: list[int]
    sampling: Sampling
    adapter: AdapterSpec | None
    text: TextStream
    generator: torch.Generator
    sink: Any = None  # the engine's per-request queue (event-loop side)
    generated: list[int] = field(default_factory=list)
    length: int = 0  # real (unpadded) tokens in this row's KV cache
    cancelled: bool = False
    finished: bool = False

    group: str = ""  # "" for the shared base/stacked group; the key of a PEFT-served adapter's own group
    kv_slot: int = -1  # its slot in the compiled path's static KV cache (hf_compiled), while it holds one

    @property
    def key(self) -> str:
        return self.adapter.key if self.adapter else ""


class Decoder(Protocol):
    """One group's decode step, on the worker thread."""

    key: str  # the group: "" the main one (base and stacked LoRA/rsLoRA rows), else a PEFT adapter's key
    rows: list[Row]

    def join(self, row: Row, cache: Any) -> None:
        """Take a prefilled row (row.length tokens in `cache`, a DynamicCache) into `rows`."""
        ...

    def decode(self) -> torch.Tensor:
        """One token for every row (its last generated one goes in at row.length) -> fp32 logits
        [len(rows), vocab] in `rows` order; every row's length grows by one."""
        ...

    def leave(self, row: Row) -> None:
        """Drop `row` and its KV; the other rows decode on as before."""
        ...

    def refresh(self) -> None:
        """The stacked adapters' shapes may have changed (an adapter load)."""
        ...

    def reset(self) -> None:
        """Drop every row (after a failed step)."""
        ...

    def status(self) -> tuple[str, str] | None:
        """(what the steps run, why eager) for EngineInfo.extra; None: nothing to say (eager only)."""
        ...


class EagerDecoder:
    """A group's decode on one left-padded DynamicCache: a joining row's [1, H, P, D] cache and the
    group's [B, H, T, D] are padded on the left to one length; a leaving row's row is cut out."""

    def __init__(self, key: str, forward: Forward, device: torch.device) -> None:
        self.key = key
        self.rows: list[Row] = []
        self.cache: Any = None  # DynamicCache, keys/values [B, heads, T, head_dim]
        self.mask: torch.Tensor | None = None  # [B, T] 1 = real token, 0 = left padding
        self._forward = forward
        self.device = device

    def join(self, row: Row, cache: Any) -> None:
        mask = torch.ones((1, row.length), dtype=torch.long, device=self.device)
        if not self.rows:
            self.rows, self.cache, self.mask = [row], cache, mask
            return
        assert self.mask is not None
        t, p = self.mask.shape[1], row.length
        length = max(t, p)
        for old, new in zip(_layers(self.cache), _layers(cache), strict=True):
            old.keys = torch.cat([_pad_left(old.keys, length), _pad_left(new.keys, length)], dim=0)
            old.values = torch.cat([_pad_left(old.values, length), _pad_left(new.values, length)], dim=0)
        self.mask = torch.cat([_pad_left(self.mask, length), _pad_left(mask, length)], dim=0)
        self.rows.append(row)

    def decode(self) -> torch.Tensor:
        assert self.mask is not None
        ids = torch.tensor([[r.generated[-1]] for r in self.rows], device=self.device)
        positions = torch.tensor([[r.length] for r in self.rows], device=self.device)  # [B, 1]
        self.mask = torch.cat([self.mask, torch.ones_like(ids)], dim=1)
        logits = self._forward(
            self.key,
            self.rows,
            input_ids=ids,
            attention_mask=self.mask,
            position_ids=positions,
            past_key_values=self.cache,
        )
        for r in self.rows:
            r.length += 1
        return logits

    def leave(self, row: Row) -> None:
        keep = [i for i, r in enumerate(self.rows) if r is not row]
        if not keep:
            self.reset()
            return
        self.rows = [self.rows[i] for i in keep]
        assert self.mask is not None
        index = torch.tensor(keep, device=self.device)
        mask = self.mask[index]
        first = int(mask.any(dim=0).nonzero()[0])  # columns that are padding in every row left go
        self.mask = mask[:, first:]
        for layer in _layers(self.cache):
            layer.keys = layer.keys[index, :, first:]
            layer.values = layer.values[index, :, first:]

    def refresh(self) -> None:
        """Nothing compiled: any adapter shape runs as it is."""

    def reset(self) -> None:
        self.rows, self.cache, self.mask = [], None, None

    def status(self) -> tuple[str, str] | None:
        return None


def _layers(cache: Any) -> list[Any]:
    layers = list(cache.layers)
    if any(type(layer).__name__ != "DynamicLayer" for layer in layers):
        raise EffllmError(
            "internal", "hf engine: only full-attention KV caches (DynamicLayer) can be batched"
        )
    return layers


def _pad_left(t: torch.Tensor, length: int) -> torch.Tensor:
    """Zero-pad dim 2 (KV: [B, H, T, D]) or dim 1 (mask: [B, T]) on the left up to `length`."""
    dim = 2 if t.dim() == 4 else 1
    missing = length - t.shape[dim]
    if missing == 0:
        return t
    shape = list(t.shape)
    shape[dim] = missing
    return torch.cat([t.new_zeros(shape), t], dim=dim)
