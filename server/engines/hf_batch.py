"""The hf engine's batch: rows in groups, one decode step for all of them, sampling. Runs on ONE worker
thread.

Rows are grouped so that each group is one model forward per step: the main group for the base and every
LoRA/rsLoRA adapter together (hf_lora's stacked adapters: each row reads its own adapter's slot in one
batched forward), and one group per adapter only PEFT can serve (DoRA and other variants, on PEFT's
`set_adapter`). A joining row is prefilled alone (`prefill`, a DynamicCache) and handed to its group's
decoder (hf_decoder.Decoder), which holds its KV until it leaves: PEFT groups and, by default, the main
group decode on hf_decoder.EagerDecoder (one left-padded DynamicCache); with HfConfig.compile_decode the
engine gives the main group hf_compiled.CompiledDecoder instead (`use`: a static KV cache slot per row,
one compiled step). The batch itself does not know which one runs.

Invariant: only the worker thread runs the model and writes the adapters and the caches (hf_compiled's
compile thread reads them and writes only its static cache's spare position); the event loop hands in
joiners and cancelled rows and gets (row, TokenEvent) pairs back.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch

from .base import AdapterSpec, EffllmError, FinishReason, Sampling, TokenEvent, Usage
from .hf_decoder import Decoder, EagerDecoder, Row
from .hf_lora import StackedLora, read_lora

log = logging.getLogger(__name__)


class Batch:
    def __init__(self, model: Any, eos_ids: set[int], device: str, slots: int = 16) -> None:
        self.base = model  # PEFT (when an adapter needs it) injects adapter layers into it in place
        # LoRA/rsLoRA adapters: forward hooks on the model's Linears, installed before PEFT touches it
        self.stack = StackedLora(model, device, slots)
        self.peft: Any = None  # PeftModel, created by the first adapter only PEFT can serve (DoRA...)
        self.adapters: dict[str, AdapterSpec] = {}
        self.eos_ids = eos_ids
        self.device = torch.device(device)
        self.main: Decoder = EagerDecoder("", self._forward, self.device)  # base and stacked-LoRA rows
        self.peft_groups: dict[str, EagerDecoder] = {}  # adapter key -> its group, while it holds rows

    def use(self, decoder: Decoder) -> None:
        """Decode the main group on `decoder` from now on (the engine, before any row joins)."""
        if self.main.rows:
            raise RuntimeError("the main group's decoder changes only while it holds no rows")
        self.main = decoder

    @property
    def compiled(self) -> Decoder | None:
        """The main group's decoder when it is not the eager one (HfConfig.compile_decode); tests and
        benches read its figures."""
        return None if isinstance(self.main, EagerDecoder) else self.main

    @property
    def groups(self) -> dict[str, Decoder]:
        """The groups that hold rows, by key ("" = the main group)."""
        out: dict[str, Decoder] = {"": self.main} if self.main.rows else {}
        out.update(self.peft_groups)
        return out

    # --- adapters -------------------------------------------------------------------------------------
    def add_adapter(self, spec: AdapterSpec) -> None:
        if spec.key in self.adapters:
            return
        lora = None if spec.method == "dora" else read_lora(spec.path, self.stack.linears)
        if lora is not None:
            self.stack.add(spec.key, lora)
            self.main.refresh()  # new stacked shapes: a compiled decoder compiles them off this thread
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
        return self.group_of_key(row.key)

    def group_of_key(self, key: str) -> str:
        """The main group ("") for the base and stacked adapters, else the PEFT-only adapter's own key."""
        return key if key and key not in self.stack else ""

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
            logits = group.decode()
            tokens = pick_tokens(logits, group.rows)
            for row, token in zip(list(group.rows), tokens, strict=True):
                out.append((row, self._advance(row, token)))
                if row.finished:
                    self._drop(row)
        for row in joiners:
            row.group = self.group_of(row)
            logits, cache = self.prefill(row)
            out.append((row, self._advance(row, pick_tokens(logits[None], [row])[0])))
            if not row.finished:
                self._group(row.group).join(row, cache)
        return out

    def reset(self) -> None:
        self.main.reset()
        self.peft_groups.clear()

    def prefill(self, row: Row) -> tuple[torch.Tensor, Any]:
        """`row`'s prompt alone, on its group's adapter -> (last-position fp32 logits [vocab], its
        DynamicCache); row.length becomes the prompt's length. Worker thread, under inference_mode."""
        from transformers import DynamicCache

        ids = torch.tensor([row.prompt_ids], device=self.device)
        cache = DynamicCache(config=self.base.config)
        logits = self._forward(
            row.group, [row], input_ids=ids, attention_mask=torch.ones_like(ids), past_key_values=cache
        )
        row.length = len(row.prompt_ids)
        return logits[0], cache

    def _forward(self, group_key: str, rows: list[Row], **inputs: Any) -> torch.Tensor:
        """Last-position logits [B, vocab] in fp32 for `rows`, all on the same adapter group."""
        inputs.update(use_cache=True, logits_to_keep=1)
        slots = [] if group_key else [self.stack.slot(r.key) for r in rows]  # a PEFT group has none
        with self._adapted(group_key, slots):
            out = self.base(**inputs)
        return out.logits[:, -1, :].float()

    @contextmanager
    def _adapted(self, group_key: str, slots: list[int]) -> Iterator[None]:
        """Within the block, forwards run on group `group_key` (a PEFT-only adapter, DoRA...), or with
        stacked slot `slots[i]` on batch row i of the main group."""
        if group_key:  # an adapter only PEFT serves: the whole group runs on it
            peft = self.peft.base_model
            peft.set_adapter(group_key)
            peft.enable_adapter_layers()
            try:
                yield
            finally:
                peft.disable_adapter_layers()
        else:
            with self.stack.rows(slots):
                yield

    @torch.inference_mode()
    def probe(self, key: str, token: int) -> bool:
        """Is one token's forward on adapter `key` finite? The decoder alone (no KV cache, no sampling,
        no text), up to its final norm: every adapted Linear of every layer runs on the token, which is
        what the check needs. The LM head runs only when the adapter targets it: on the normed hidden
        state h (finite, |h_i| <= sqrt(d) * max|gamma|) the base head's logits are finite, and skipping
        it saves a fifth of a small model's weight reads (SmolLM2-135M: 28M of 135M parameters)."""
        group = self.group_of_key(key)
        ids = torch.tensor([[token]], device=self.device)
        with self._adapted(group, [self.stack.slot(key) if not group else 0]):
            hidden = self.base.get_decoder()(input_ids=ids, use_cache=False).last_hidden_state  # [1, 1, d]
            if self._head_adapted(key):
                hidden = self.base.get_output_embeddings()(hidden)  # [1, 1, vocab]
        return bool(torch.isfinite(hidden).all())

    def _head_adapted(self, key: str) -> bool:
        head = self.base.get_output_embeddings()
        if key in self.stack:
            return any(
                self.stack.linears.get(name) is head and self.stack.slots[key] in stack.used
                for name, stack in self.stack.stacks.items()
            )
        return hasattr(head, "lora_A")  # PEFT wrapped it (a LoraLayer): some adapter targets the head

    def _group(self, key: str) -> Decoder:
        """The decoder of group `key` ("" = the main one); a PEFT group is made at its first row."""
        if not key:
            return self.main
        group = self.peft_groups.get(key)
        if group is None:
            group = self.peft_groups[key] = EagerDecoder(key, self._forward, self.device)
        return group

    def _drop(self, row: Row) -> None:
        group = self.main if not row.group else self.peft_groups.get(row.group)
        if group is None or row not in group.rows:
            return
        group.leave(row)
        if row.group and not group.rows:
            del self.peft_groups[row.group]

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
