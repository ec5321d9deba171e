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
SERVING. The stacked adapters' storage shapes (hf_lora: the set of targeted Linears, slot count, largest
rank; `StackedLora.shapes` counts their changes) are part of a graph: when an adapter load changes them,
`refresh` compiles the new shapes on a background thread ("hf-compile") while the worker's steps run the
same static step eagerly (same math, same tokens); the graphs take over at the first step after they are
ready. So an adapter load returns when the adapter is routable and no step waits for a compile. Joining
rows are prefilled on the eager path (hf_batch) and their DynamicCache copied into their slot; DoRA groups
stay on the eager path entirely.

On CPU, inductor's C++ kernels run single-threaded by default (HfConfig.compile_threads): a kernel with
`#pragma omp parallel num_threads(N)` waits at its barrier for all N threads, so with another process
keeping a core busy every one of the few hundred kernels of a step waited for a descheduled thread to get
a time slice again (issue 27: 40-70x slower than eager). The matrix products stay extern calls (ATen's
threads, as eager). `StepWatch` still times both paths: now and then one step runs eagerly, and when
compiled steps take over `ratio` times the eager one the decoder falls back to eager by itself (and
probes compiled again later); `status()` says which runs and why (EngineInfo.extra, GetModelInfo).

If inductor cannot compile (a model, dtype or tensor subclass it does not handle) the same static step
runs eagerly: correct, slower, and the log says so. `mode` says which one runs.

Invariant: a row holds exactly one cache slot from join to leave (moved only by _compact, K/V with it)
and no other row writes to it; warm-up writes only at position max_len, the spare one no step reads, so
it can run on the compile thread while the worker decodes; the worker calls the compiled function only
with shapes it was warmed up for (never compiles).
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

from .hf_decoder import Row
from .hf_lora import StackedLora
from .hf_static import (
    StaticKV,
    decode_step,
    fuse_projections,
    lora_inputs,
    module_names,
    read_weights,
    unsupported,
)

log = logging.getLogger(__name__)

LENGTH_STEP = 64  # attention length granularity: rows attend over their longest row rounded up to this
_RECOMPILE_LIMIT = 64  # graphs dynamo keeps per function (default 8): engines and adapter shapes add up


def _raise_recompile_limit() -> None:
    """Let dynamo keep `_RECOMPILE_LIMIT` graphs of the step. NOTE: torch's dynamo config is thread-local
    (torch 2.13: a value set on one thread reads as the default 8 on another), so every thread that calls
    the compiled step (the engine's worker, the compile thread) sets it for itself; past the limit a
    fullgraph compile fails hard and the step falls back to eager for good."""
    import torch._dynamo

    cfg: Any = torch._dynamo.config
    cfg.recompile_limit = max(int(cfg.recompile_limit), _RECOMPILE_LIMIT)


Path = Literal["compiled", "eager"]


def buckets(max_rows: int) -> tuple[int, ...]:
    """1, 2, 4, ... below max_rows, then max_rows itself: the batch sizes a step is padded to."""
    out = [1]
    while out[-1] * 2 < max_rows:
        out.append(out[-1] * 2)
    if out[-1] < max_rows:
        out.append(max_rows)
    return tuple(out)


@dataclass
class StepWatch:
    """Compiled or eager, from measured step times (per batch bucket). Plain numbers in, no clock of its
    own: the decoder times each step and `record`s it.

    The current path runs; every `every` steps one step runs on the other path (a probe). A probe gives a
    verdict: with compiled current, "eager is better" when compiled's recent time (an EWMA) is over
    `ratio` x the eager probe; with eager current, "compiled is better" when the compiled probe is at or
    under eager's EWMA. `confirm` verdicts in a row switch the path (and say why); a probe that does not
    switch doubles `every` up to `max_every`, so a slow path costs little to keep watching. While compiled
    runs and its EWMA already exceeds `ratio` x the last eager figure, the next probe comes after `gap`
    steps instead: contention that starts mid-stream is caught in a few steps."""

    ratio: float = 1.5
    first: int = 2  # steps before the first probe: an eager figure to compare with, early
    base_every: int = 64
    max_every: int = 1024
    gap: int = 2
    confirm: int = 2
    alpha: float = 0.3  # EWMA weight of the newest step
    current: Path = "compiled"
    reason: str = ""
    every: int = 0
    since: int = 0
    verdicts: int = 0
    ewma: dict[tuple[Path, int], float] = field(default_factory=dict)  # (path, bucket) -> seconds
    switches: int = 0

    def __post_init__(self) -> None:
        self.every = self.first

    @staticmethod
    def other(path: Path) -> Path:
        return "eager" if path == "compiled" else "compiled"

    def choose(self, bucket: int) -> Path:
        """The path of the next step of this bucket."""
        due = self.since >= self.every
        if not due and self.current == "compiled" and self.since >= self.gap:
            now, eager = self.ewma.get(("compiled", bucket)), self.ewma.get(("eager", bucket))
            due = now is not None and eager is not None and now > self.ratio * eager
        return self.other(self.current) if due else self.current

    def record(self, path: Path, bucket: int, seconds: float) -> str | None:
        """A step's time; returns a message when the path changes."""
        key = (path, bucket)
        if path == self.current or key not in self.ewma:
            old = self.ewma.get(key, seconds)
            self.ewma[key] = old + self.alpha * (seconds - old)
        if path == self.current:
            self.since += 1
            return None
        self.since = 0
        self.ewma[key] = seconds  # a probe: the newest figure of the other path
        cur = self.ewma.get((self.current, bucket))
        if cur is None:
            return None
        compiled, eager = (cur, seconds) if self.current == "compiled" else (seconds, cur)
        better = compiled > self.ratio * eager if self.current == "compiled" else compiled <= eager
        self.verdicts = self.verdicts + 1 if better else 0
        if self.verdicts < self.confirm:  # better: confirm soon; else back off
            self.every = self.gap if better else min(max(self.every * 2, self.base_every), self.max_every)
            return None
        self.current, self.verdicts, self.every = path, 0, self.base_every
        self.switches += 1
        figures = f"compiled {compiled:.3f} s/step vs eager {eager:.3f} at batch {bucket}"
        self.reason = f"contention: {figures}" if path == "eager" else ""
        if path == "eager":
            return f"compiled decode falls back to eager ({self.reason})"
        return f"compiled decode resumes: {figures}"


class CompiledDecoder:
    """The main group's decode (an hf_decoder.Decoder): slots, the (compiled) step, warm-up. Used by
    hf_batch on its worker thread; `refresh` compiles new adapter shapes on a thread of its own."""

    def __init__(
        self,
        model: Any,
        stack: StackedLora,
        device: str,
        max_rows: int,
        max_len: int,
        compile: bool = True,
        threads: int = 1,
    ) -> None:
        reason = unsupported(model, stack.linears)
        if reason is not None:
            raise ValueError(reason)
        self.key = ""  # the main group: base and stacked LoRA/rsLoRA rows
        self.rows: list[Row] = []  # the rows holding a slot, in join order
        self.stack = stack
        self.device = torch.device(device)
        self.names = module_names(model.config.num_hidden_layers)
        self.fused = fuse_projections(model, stack.linears)  # q/k/v and gate/up: one product each
        self.weights = read_weights(model, stack.linears)
        self.kv = StaticKV(self.weights, max_rows, max_len, self.weights.norm.dtype, self.device)
        self.buckets = buckets(max_rows)
        self.embed = model.get_input_embeddings()
        self.rotary = model.model.rotary_emb  # the model's own RoPE (its scaling variants included)
        self.threads = threads  # inductor C++ kernels' OpenMP threads (0: torch.get_num_threads())
        self.graphs = 0  # graphs compiled so far (the backend counts them)
        self.step_graphs = 0  # of which compiled by a decode step, not a warm-up (a stall: should stay 0)
        self._local = threading.local()  # .warming: this thread runs warm_up
        self.steps = 0
        self.eager_steps = 0  # steps that ran the static step eagerly while compiled is the mode
        self.mode = "compiled" if compile else "eager"
        self._fn: Any = self._compile() if compile else decode_step
        self._ready = -1  # the StackedLora.shapes value the graphs are warmed up for
        self._compiler: threading.Thread | None = None
        self.compiles = 0  # background compiles done (each: every bucket, for one shape version)
        self.compile_s: list[float] = []  # seconds each took
        # CPU only: a CUDA step's time is its launch unless synchronised, and CUDA has no OpenMP barriers
        self.watch: StepWatch | None = StepWatch() if self.device.type == "cpu" else None
        self.clock = time.perf_counter  # the watch's timer (tests inject step times through it)
        self.warmup_s: dict[int, float] = {}

    # --- slots -----------------------------------------------------------------------------------------
    def join(self, row: Row, cache: Any) -> None:
        """Give a prefilled row (row.length tokens in `cache`, a DynamicCache) a slot and its K/V."""
        row.kv_slot = self.kv.take()
        self.kv.write(row.kv_slot, cache)
        self.rows.append(row)

    def leave(self, row: Row) -> None:
        self.kv.release(row.kv_slot)
        row.kv_slot = -1
        self.rows.remove(row)

    def reset(self) -> None:
        self.kv.reset()
        self.rows = []

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
    def decode(self) -> torch.Tensor:
        """One token for each row (each holds a slot; its last generated token goes in at row.length)
        -> fp32 logits [len(rows), vocab] in `rows` order; every row's length grows by one."""
        rows = self.rows
        b = next(x for x in self.buckets if x >= len(rows))
        if max(r.kv_slot for r in rows) >= b:  # rows left below a high one: move it down, run a small bucket
            self._compact(rows, b)
        ids, pos, adapters = [0] * b, [0] * b, [0] * b
        for r in rows:
            ids[r.kv_slot], pos[r.kv_slot] = r.generated[-1], r.length
            adapters[r.kv_slot] = self.stack.slot(r.key)
        length = min(self.kv.max_len, -(-(max(pos) + 1) // LENGTH_STEP) * LENGTH_STEP)
        logits = self._step(ids, pos, adapters, length)  # [b, vocab]
        for r in rows:
            r.length += 1
        self.steps += 1
        return logits.index_select(0, torch.tensor([r.kv_slot for r in rows], device=self.device))

    def ready(self) -> bool:
        """The graphs fit the stacked adapters' shapes as they are now."""
        return self.mode == "compiled" and self._ready == self.stack.shapes

    def _step(self, ids: list[int], pos: list[int], adapters: list[int], length: int) -> torch.Tensor:
        """One step on the graphs when they fit and the watch picks them, else the same step eagerly."""
        if not self.ready():
            self.eager_steps += 1
            return self._run(ids, pos, adapters, length, "eager")
        if self.watch is None:
            return self._run(ids, pos, adapters, length, "compiled")
        b = len(ids)
        path = self.watch.choose(b)
        t0 = self.clock()
        logits = self._run(ids, pos, adapters, length, path)
        message = self.watch.record(path, b, self.clock() - t0)
        if path == "eager":
            self.eager_steps += 1
        if message:
            log.warning("hf engine: %s", message)
        return logits

    def _run(
        self, ids: list[int], pos: list[int], adapters: list[int], length: int, path: Path = "compiled"
    ) -> torch.Tensor:
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
        if self.mode == "compiled" and path == "compiled":
            self._mark_dynamic(x, cos, sin, pos_t, mask, rows_t, scale)
            if not getattr(self._local, "limit_set", False):
                _raise_recompile_limit()  # per thread: dynamo's config is thread-local
                self._local.limit_set = True
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

    def status(self) -> tuple[str, str] | None:
        """(what the last steps ran: "compiled" or "eager", and why eager), for EngineInfo.extra."""
        if self.mode != "compiled":
            return "eager", "inductor cannot compile this model's step"
        if not self.ready():
            return "eager", "compiling new adapter shapes"
        if self.watch is not None and self.watch.current == "eager":
            return "eager", self.watch.reason
        return "compiled", ""

    # --- compile and warm-up ---------------------------------------------------------------------------
    def _compile(self) -> Any:
        import torch._dynamo

        _raise_recompile_limit()
        # inductor's C++ kernels' OpenMP threads, fixed when a kernel is generated (see the docstring)
        patches: dict[str, Any] = {"emulate_precision_casts": True}
        if self.threads > 0:
            patches["cpp.threads"] = self.threads

        def backend(gm: Any, example_inputs: Any) -> Any:
            from torch._inductor.compile_fx import compile_fx

            self.graphs += 1
            if not getattr(self._local, "warming", False):
                self.step_graphs += 1
            # round bf16 intermediates as eager does, so compiled and eager greedy tokens agree
            return compile_fx(gm, example_inputs, config_patches=patches)

        return torch.compile(decode_step, backend=backend, fullgraph=True)

    @torch.inference_mode()
    def warm_up(self) -> dict[int, float]:
        """Run every bucket once (compiling the graphs still missing) for the stacked adapters' shapes as
        they are now; seconds per bucket. Safe while rows hold slots and decode on another thread: every
        padded row writes only position max_len, which no step reads (see the invariant)."""
        version = self.stack.shapes  # read before the shapes it stands for (see StackedLora.shapes)
        if self.mode != "compiled":
            return {}
        times: dict[int, float] = {}
        spare = self.kv.max_len
        self._local.warming = True
        try:
            for b in self.buckets:
                t0 = time.perf_counter()
                self._run([0] * b, [spare] * b, [0] * b, self.kv.max_len)
                times[b] = time.perf_counter() - t0
        finally:
            self._local.warming = False
        self.warmup_s = times
        self._ready = version
        return times

    def refresh(self) -> None:
        """After an adapter load (worker thread): if the stacked adapters' shapes changed, compile them on
        the compile thread; steps run eagerly until its graphs fit (`ready`)."""
        if self.mode != "compiled" or self.ready():
            return
        if self._compiler is not None and self._compiler.is_alive():
            return  # it compiles again if the shapes moved on while it ran
        self._compiler = threading.Thread(target=self._compile_loop, name="hf-compile", daemon=True)
        self._compiler.start()

    def _compile_loop(self) -> None:
        try:
            while self.mode == "compiled" and not self.ready():
                t0, graphs = time.perf_counter(), self.graphs
                self.warm_up()
                self.compiles += 1
                self.compile_s.append(time.perf_counter() - t0)
                log.info(
                    "hf engine: compiled decode ready for the new adapter shapes: %d graphs in %.1f s "
                    "(steps ran eagerly meanwhile)",
                    self.graphs - graphs,
                    time.perf_counter() - t0,
                )
        except Exception:
            log.exception("compiling new adapter shapes failed: the static step runs eagerly from now on")
            self.mode = "eager"

    def wait_ready(self, timeout: float | None = None) -> bool:
        """Block until no compile is under way (tests, benchmarks); True when the graphs fit."""
        thread = self._compiler
        if thread is not None:
            thread.join(timeout)
        return self.ready()
