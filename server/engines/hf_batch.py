"""The hf engine's batch: rows, their KV caches, one decode step, sampling. Runs on ONE worker thread.

Rows are grouped so that each group is one model forward per step: one group for the base and every
LoRA/rsLoRA adapter together (hf_lora's stacked adapters: each row reads its own adapter's slot in one
batched forward), and one group per adapter only PEFT can serve (DoRA and other variants, on PEFT's
`set_adapter`). Each group owns a left-padded KV cache: a joining row is prefilled alone and its
cache is padded into the group's; a leaving row is dropped from it. Positions are per row (real tokens
so far), so padding never changes what a row computes. With `compiled` set (HfConfig.compile_decode),
the main group instead decodes on hf_compiled: a static KV cache slot per row, one compiled step; joining
rows are still prefilled here, and PEFT-only groups keep the path above.

Invariant: only the worker thread runs the model and writes the adapters and the caches (hf_compiled's
compile thread reads them and writes only its static cache's spare position); the event loop hands in
joiners and cancelled rows and gets (row, TokenEvent) pairs back.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from .base import AdapterSpec, EffllmError, FinishReason, Sampling, TokenEvent, Usage
from .hf_lora import StackedLora, read_lora
from .hf_text import TextStream

if TYPE_CHECKING:
    from .hf_compiled import CompiledDecoder

log = logging.getLogger(__name__)


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


@dataclass(eq=False)
class Group:
    key: str
    rows: list[Row] = field(default_factory=list)
    cache: Any = None  # DynamicCache, keys/values [B, heads, T, head_dim]
    mask: torch.Tensor | None = None  # [B, T] 1 = real token, 0 = left padding


class Batch:
    def __init__(self, model: Any, eos_ids: set[int], device: str, slots: int = 16) -> None:
        self.base = model  # PEFT (when an adapter needs it) injects adapter layers into it in place
        # LoRA/rsLoRA adapters: forward hooks on the model's Linears, installed before PEFT touches it
        self.stack = StackedLora(model, device, slots)
        self.peft: Any = None  # PeftModel, created by the first adapter only PEFT can serve (DoRA...)
        self.adapters: dict[str, AdapterSpec] = {}
        self.eos_ids = eos_ids
        self.device = torch.device(device)
        self.groups: dict[str, Group] = {}
        # HfConfig.compile_decode: the main group decodes on hf_compiled (static KV, compiled step);
        # None: the eager path below, exactly as without the switch
        self.compiled: CompiledDecoder | None = None

    # --- adapters -------------------------------------------------------------------------------------
    def add_adapter(self, spec: AdapterSpec) -> None:
        if spec.key in self.adapters:
            return
        lora = None if spec.method == "dora" else read_lora(spec.path, self.stack.linears)
        if lora is not None:
            self.stack.add(spec.key, lora)
            if self.compiled is not None:  # new stacked shapes: compiled off this thread, eager meanwhile
                self.compiled.refresh()
        else:
            self._add_peft(spec)
        self.adapters[spec.key] = spec

    def _add_peft(self, spec: AdapterSpec) -> None:
        from peft import PeftModel

        try:
            if self.peft is None:
                self.peft = PeftModel.from_pretrained(self.base, str(spec.path), adapter_name=spec.key)
            else:
                self.peft.load_adapter(str(spec.path), adapter_name=spec.key)
        except Exception as exc:  # the registry validated it; a failure here is still the adapter's fault
            raise EffllmError(
                "failed_precondition", f"adapter {spec.key}: PEFT cannot load it: {exc}"
            ) from exc
        self.peft.eval()
        self.peft.base_model.disable_adapter_layers()  # on only for its own group's forward (_forward)

    def remove_adapter(self, key: str) -> None:
        if key not in self.adapters:
            return
        if key in self.stack:
            self.stack.remove(key)
        else:
            self.peft.delete_adapter(key)
        del self.adapters[key]

    def group_of(self, row: Row) -> str:
        return row.key if row.key and row.key not in self.stack else ""

    # --- one step ---------------------------------------------------------------------------------------
    def rows(self) -> list[Row]:
        return [r for g in self.groups.values() for r in g.rows]

    @torch.inference_mode()
    def step(self, joiners: list[Row], cancelled: list[Row]) -> list[tuple[Row, TokenEvent]]:
        """Drop cancelled rows, decode one token for every running row, then prefill the joiners."""
        for row in cancelled:
            self._drop(row)
        out: list[tuple[Row, TokenEvent]] = []
        for group in list(self.groups.values()):
            logits = self._decode(group)
            tokens = pick_tokens(logits, group.rows)
            for row, token in zip(list(group.rows), tokens, strict=True):
                out.append((row, self._advance(row, token)))
                if row.finished:
                    self._drop(row)
        for row in joiners:
            row.group = self.group_of(row)
            logits, cache = self._prefill(row)
            out.append((row, self._advance(row, pick_tokens(logits[None], [row])[0])))
            if not row.finished:
                self._join(row, cache)
        return out

    def reset(self) -> None:
        self.groups.clear()
        if self.compiled is not None:
            self.compiled.reset()

    def _forward(self, group_key: str, rows: list[Row], **inputs: Any) -> torch.Tensor:
        """Last-position logits [B, vocab] in fp32 for `rows`, all on the same adapter group."""
        inputs.update(use_cache=True, logits_to_keep=1)
        if group_key:  # an adapter only PEFT serves (DoRA...): the whole group runs on it
            peft = self.peft.base_model
            peft.set_adapter(group_key)
            peft.enable_adapter_layers()
            try:
                out = self.base(**inputs)
            finally:
                peft.disable_adapter_layers()
        else:
            with self.stack.rows([self.stack.slot(r.key) for r in rows]):
                out = self.base(**inputs)
        return out.logits[:, -1, :].float()

    def _prefill(self, row: Row) -> tuple[torch.Tensor, Any]:
        from transformers import DynamicCache

        ids = torch.tensor([row.prompt_ids], device=self.device)
        cache = DynamicCache(config=self.base.config)
        logits = self._forward(
            row.group, [row], input_ids=ids, attention_mask=torch.ones_like(ids), past_key_values=cache
        )
        row.length = len(row.prompt_ids)
        return logits[0], cache

    def _decode(self, group: Group) -> torch.Tensor:
        if self.compiled is not None and not group.key:
            return self.compiled.decode(group.rows)
        assert group.mask is not None
        ids = torch.tensor([[r.generated[-1]] for r in group.rows], device=self.device)
        positions = torch.tensor([[r.length] for r in group.rows], device=self.device)  # [B, 1]
        group.mask = torch.cat([group.mask, torch.ones_like(ids)], dim=1)
        logits = self._forward(
            group.key,
            group.rows,
            input_ids=ids,
            attention_mask=group.mask,
            position_ids=positions,
            past_key_values=group.cache,
        )
        for r in group.rows:
            r.length += 1
        return logits

    def _join(self, row: Row, cache: Any) -> None:
        """Pad the row's [1, H, P, D] cache and the group's [B, H, T, D] on the left to one length."""
        if self.compiled is not None and not row.group:  # its own slot of the static cache: nothing moves
            self.compiled.join(row, cache)
            self.groups.setdefault("", Group("")).rows.append(row)
            return
        group = self.groups.get(row.group)
        mask = torch.ones((1, row.length), dtype=torch.long, device=self.device)
        if group is None:
            self.groups[row.group] = Group(row.group, [row], cache, mask)
            return
        assert group.mask is not None
        t, p = group.mask.shape[1], row.length
        length = max(t, p)
        for old, new in zip(_layers(group.cache), _layers(cache), strict=True):
            old.keys = torch.cat([_pad_left(old.keys, length), _pad_left(new.keys, length)], dim=0)
            old.values = torch.cat([_pad_left(old.values, length), _pad_left(new.values, length)], dim=0)
        group.mask = torch.cat([_pad_left(group.mask, length), _pad_left(mask, length)], dim=0)
        group.rows.append(row)

    def _drop(self, row: Row) -> None:
        group = self.groups.get(row.group)
        if group is None or row not in group.rows:
            return
        if self.compiled is not None and not group.key:  # the slot is free again; other rows stay put
            self.compiled.leave(row)
            group.rows.remove(row)
            if not group.rows:
                del self.groups[group.key]
            return
        keep = [i for i, r in enumerate(group.rows) if r is not row]
        group.rows = [group.rows[i] for i in keep]
        if not keep:
            del self.groups[group.key]
            return
        assert group.mask is not None
        index = torch.tensor(keep, device=self.device)
        mask = group.mask[index]
        first = int(mask.any(dim=0).nonzero()[0])  # columns that are padding in every row left go
        group.mask = mask[:, first:]
        for layer in _layers(group.cache):
            layer.keys = layer.keys[index, :, first:]
            layer.values = layer.values[index, :, first:]

    # --- sampling and text -------------------------------------------------------------------------------
    def _advance(self, row: Row, token: int) -> TokenEvent:
        row.generated.append(token)
        finish: FinishReason | None = None
        if token in self.eos_ids and not row.sampling.ignore_eos:
            finish, text = "stop", row.text.flush()
        else:
            text = row.text.add(token)
            if row.text.stopped:
                finish = "stop"
            elif len(row.generated) >= row.sampling.max_new_tokens:
                finish, text = "length", text + row.text.flush()
        row.finished = finish is not None
        return TokenEvent(
            text=text,
            token_ids=(token,),
            finish_reason=finish,
            usage=Usage(len(row.prompt_ids), len(row.generated)) if finish else None,
            adapter=row.key,
        )


def pick_tokens(logits: torch.Tensor, rows: list[Row]) -> list[int]:
    """One token per row from fp32 logits [B, vocab]. Plain greedy rows share one argmax and one device to
    host copy: on a GPU each `int(tensor)` is a sync, and a sync per row per step was host-bound there."""
    greedy = [r.sampling.temperature == 0.0 and r.sampling.repetition_penalty == 1.0 for r in rows]
    argmax: list[int] = logits.argmax(-1).tolist() if any(greedy) else []
    return [
        argmax[i] if greedy[i] else sample(logits[i], r.sampling, r.generator, r.prompt_ids + r.generated)
        for i, r in enumerate(rows)
    ]


def sample(logits: torch.Tensor, s: Sampling, generator: torch.Generator, history: list[int]) -> int:
    """One token from fp32 logits [vocab]: repetition penalty, then greedy or temperature/top-k/top-p."""
    if s.repetition_penalty != 1.0:
        seen = torch.tensor(sorted(set(history)), device=logits.device)
        picked = logits[seen]
        logits = logits.clone()
        logits[seen] = torch.where(picked < 0, picked * s.repetition_penalty, picked / s.repetition_penalty)
    if s.temperature == 0.0:
        return int(logits.argmax())
    logits = logits / s.temperature
    if 0 < s.top_k < logits.numel():
        kth = torch.topk(logits, s.top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if s.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        probs = sorted_logits.softmax(-1)
        # drop a token once the tokens before it already cover top_p (the first token always stays)
        drop = (probs.cumsum(-1) - probs) >= s.top_p
        logits = logits.clone()
        logits[order[drop]] = float("-inf")
    probs = logits.softmax(-1)
    return int(torch.multinomial(probs.cpu(), 1, generator=generator))


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
