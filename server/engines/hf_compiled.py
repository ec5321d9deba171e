"""Compiled decode for the hf engine's main group (base rows and stacked LoRA/rsLoRA rows), behind
HfConfig.compile_decode: hf_static's step under torch.compile (inductor; C++ kernels on CPU), a static KV
cache whose slots rows own from join to leave, and bucketed batch sizes.

A step runs cache slots 0..bucket-1, the bucket being the smallest of 1, 2, 4, ..., max_rows that holds
the rows. A joining row takes the lowest free slot; a row left above the bucket when rows below it have
gone is moved down once (its K/V copied, nobody else touched), so a step never runs more slots than its
bucket. A slot without a row is padding (token 0 at position 0 of a free slot; its logits are dropped).
Dynamo specialises size 1, so B=1 is one graph and every other bucket shares a second one with the
batch dimension dynamic; the attention length (the longest row rounded up to 64) is dynamic in both.
Warm-up runs every bucket once at start-up, so those two graphs are compiled before the server turns
SERVING, and a step never compiles. The stacked adapters' storage shapes (hf_lora: the set of targeted
Linears, slot count, largest rank) are part of a graph: when an adapter load changes them, `refresh`
re-warms every bucket then, on the worker thread, before that adapter serves a token. Joining rows are
prefilled on the eager path (hf_batch) and their DynamicCache copied into their slot; DoRA groups stay
on the eager path entirely.

If inductor cannot compile (a model, dtype or tensor subclass it does not handle) the same static step
runs eagerly: correct, slower, and the log says so. `mode` says which one runs.

Invariant: a row holds exactly one cache slot from join to leave (moved only by _compact, K/V with it)
and no other row writes to it; warm-up writes only at position max_len-1, which any row writes before
it reads it.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Any

import torch

from .hf_lora import StackedLora
from .hf_static import StaticKV, decode_step, lora_inputs, module_names, read_weights, unsupported

if TYPE_CHECKING:
    from .hf_batch import Row

log = logging.getLogger(__name__)

LENGTH_STEP = 64  # attention length granularity: rows attend over their longest row rounded up to this
_RECOMPILE_LIMIT = 64  # graphs dynamo keeps per function (default 8): engines and adapter shapes add up


def buckets(max_rows: int) -> tuple[int, ...]:
    """1, 2, 4, ... below max_rows, then max_rows itself: the batch sizes a step is padded to."""
    out = [1]
    while out[-1] * 2 < max_rows:
        out.append(out[-1] * 2)
    if out[-1] < max_rows:
        out.append(max_rows)
    return tuple(out)


class CompiledDecoder:
    """The main group's decode: slots, the (compiled) step, warm-up. Used by hf_batch on its worker thread."""

    def __init__(
        self, model: Any, stack: StackedLora, device: str, max_rows: int, max_len: int, compile: bool = True
    ) -> None:
        reason = unsupported(model, stack.linears)
        if reason is not None:
            raise ValueError(reason)
        self.stack = stack
        self.device = torch.device(device)
        self.names = module_names(model.config.num_hidden_layers)
        self.weights = read_weights(model, stack.linears)
        self.kv = StaticKV(self.weights, max_rows, max_len, self.weights.norm.dtype, self.device)
        self.buckets = buckets(max_rows)
        self.embed = model.get_input_embeddings()
        self.rotary = model.model.rotary_emb  # the model's own RoPE (its scaling variants included)
        self.graphs = 0  # graphs compiled so far (the backend counts them)
        self.steps = 0
        self.mode = "compiled" if compile else "eager"
        self._fn: Any = self._compile() if compile else decode_step
        self._signature: tuple[Any, ...] | None = None  # the stacked adapters' shapes at the last warm-up
        self.warmup_s: dict[int, float] = {}

    # --- slots -----------------------------------------------------------------------------------------
    def join(self, row: Row, cache: Any) -> None:
        """Give a prefilled row (row.length tokens in `cache`, a DynamicCache) a slot and its K/V."""
        row.kv_slot = self.kv.take()
        self.kv.write(row.kv_slot, cache)

    def leave(self, row: Row) -> None:
        self.kv.release(row.kv_slot)
        row.kv_slot = -1

    def reset(self) -> None:
        self.kv.reset()

    def _compact(self, rows: list[Row], bucket: int) -> None:
        """Move every row at a slot >= bucket into the lowest free slot (all below bucket, since fewer
        than `bucket` rows sit there): one row's K/V copied, up to its length; no other row moves."""
        for row in sorted(rows, key=lambda r: -r.kv_slot):
            if row.kv_slot < bucket:
                break
            old, new = row.kv_slot, self.kv.take()
            self.kv.move(old, new, row.length)
            self.kv.release(old)
            row.kv_slot = new

    # --- steps -----------------------------------------------------------------------------------------
    def decode(self, rows: list[Row]) -> torch.Tensor:
        """One token for each row (each holds a slot; its last generated token goes in at row.length)
        -> fp32 logits [len(rows), vocab] in `rows` order; every row's length grows by one."""
        b = next(x for x in self.buckets if x >= len(rows))
        if max(r.kv_slot for r in rows) >= b:  # rows left below a high one: move it down, run a small bucket
            self._compact(rows, b)
        ids, pos, adapters = [0] * b, [0] * b, [0] * b
        for r in rows:
            ids[r.kv_slot], pos[r.kv_slot] = r.generated[-1], r.length
            adapters[r.kv_slot] = self.stack.slot(r.key)
        length = min(self.kv.max_len, -(-(max(pos) + 1) // LENGTH_STEP) * LENGTH_STEP)
        logits = self._run(ids, pos, adapters, length)  # [b, vocab]
        for r in rows:
            r.length += 1
        self.steps += 1
        return logits.index_select(0, torch.tensor([r.kv_slot for r in rows], device=self.device))

    def _run(self, ids: list[int], pos: list[int], adapters: list[int], length: int) -> torch.Tensor:
        dev = self.device
        ids_t = torch.tensor(ids, device=dev)  # [B]
        pos_t = torch.tensor(pos, device=dev)  # [B]
        rows_t = torch.tensor(adapters, device=dev)  # [B] adapter slot per row
        x = self.embed(ids_t[:, None])  # [B, 1, hidden]
        cos, sin = self.rotary(x, pos_t[:, None])  # [B, 1, head_dim]
        mask = torch.arange(length, device=dev)[None, :] <= pos_t[:, None]  # [B, L]
        scale = self.stack.scale.index_select(0, rows_t).view(-1, 1, 1)  # [B, 1, 1]
        loras = lora_inputs(self.stack, self.names)
        args = (self.weights, x, cos, sin, pos_t, mask, self.kv.k, self.kv.v, rows_t, scale, loras)
        if self.mode == "compiled":
            self._mark_dynamic(x, cos, sin, pos_t, mask, rows_t, scale)
            try:
                return self._fn(*args)
            except Exception:  # an inductor/dynamo failure: the same math runs eagerly from now on
                log.exception("compiled decode step failed: the static step runs eagerly from now on")
                self.mode, self._fn = "eager", decode_step
        return decode_step(*args)

    @staticmethod
    def _mark_dynamic(*per_row: torch.Tensor) -> None:
        """Batch (dim 0 of every per-row input) dynamic above 1 and the attention length (mask dim 1)
        always: one graph for B=1, one for the other buckets, at any length."""
        from torch._dynamo import maybe_mark_dynamic

        if per_row[0].shape[0] > 1:
            for t in per_row:
                maybe_mark_dynamic(t, 0)
        maybe_mark_dynamic(per_row[4], 1)  # mask [B, L]

    # --- compile and warm-up ---------------------------------------------------------------------------
    def _compile(self) -> Any:
        import torch._dynamo

        cfg: Any = torch._dynamo.config
        cfg.recompile_limit = max(int(cfg.recompile_limit), _RECOMPILE_LIMIT)

        def backend(gm: Any, example_inputs: Any) -> Any:
            from torch._inductor.compile_fx import compile_fx

            self.graphs += 1
            # round bf16 intermediates as eager does, so compiled and eager greedy tokens agree
            return compile_fx(gm, example_inputs, config_patches={"emulate_precision_casts": True})

        return torch.compile(decode_step, backend=backend, fullgraph=True)

    def _lora_signature(self) -> tuple[Any, ...]:
        return tuple(
            (name, tuple(s.a.shape), tuple(s.b.shape)) for name, s in sorted(self.stack.stacks.items())
        )

    @torch.inference_mode()
    def warm_up(self) -> dict[int, float]:
        """Run every bucket once (compiling the graphs still missing); seconds per bucket. Safe while
        rows hold slots: every padded row writes position max_len-1 only (see the invariant)."""
        self._signature = self._lora_signature()
        if self.mode != "compiled":
            return {}
        times: dict[int, float] = {}
        last = self.kv.max_len - 1
        for b in self.buckets:
            t0 = time.perf_counter()
            self._run([0] * b, [last] * b, [0] * b, self.kv.max_len)
            times[b] = time.perf_counter() - t0
        self.warmup_s = times
        return times

    def refresh(self) -> None:
        """After an adapter load: re-warm if the stacked adapters' shapes changed (a new graph each)."""
        if self.mode != "compiled" or self._lora_signature() == self._signature:
            return
        t0 = time.perf_counter()
        graphs = self.graphs
        self.warm_up()
        log.info(
            "hf engine: compiled decode re-warmed for the new adapter shapes: %d graphs in %.1f s",
            self.graphs - graphs,
            time.perf_counter() - t0,
        )
