"""The hf engine: transformers + PEFT, for what vLLM cannot do (DoRA unmerged, int4 on CPU, fp16 on CPU).

One asyncio task drives iteration-level batching: between two decode steps it admits waiting requests
(up to `max_concurrency` rows and `max_adapters_per_batch` distinct adapters) and drops cancelled ones;
each step (model forwards, sampling, detokenizing) runs on a single worker thread (see hf_batch), so the
event loop stays free and the model is never run by two threads (hf_compiled's compile thread only
reads weights and writes its static cache's spare position). Adapter loads and unloads go through the
same thread, so they happen between steps, never inside one. With `compile_decode`, base and
stacked-LoRA rows decode on hf_compiled (a static KV cache, one torch.compile'd step, batch buckets
warmed up inside start(), so the server turns SERVING only once they are compiled; shapes that a later
adapter load brings compile on a thread of their own while steps run eagerly).
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import AsyncIterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

from ...common.model import ResolvedModel, count_parameters, max_position_embeddings
from ...telemetry.proctree import engine_threads
from .base import (
    BYTES_PER_PARAM,
    PRECISIONS,
    AdapterSpec,
    EffllmError,
    EngineInfo,
    GenerationRequest,
    Precision,
    TokenEvent,
)
from .prompting import PromptRenderer

if TYPE_CHECKING:
    from .hf_batch import Batch
    from .hf_decoder import Row

log = logging.getLogger(__name__)

_DTYPES = {
    "fp32": "float32",
    "bf16": "bfloat16",
    "fp16": "float16",
    "int4": "bfloat16",
}  # int4: bf16 activations


@dataclass(frozen=True)
class HfConfig:
    precision: Precision = "fp32"
    max_context: int = 2048
    max_concurrency: int = 32  # rows decoded together (batch slots)
    device: str = "cpu"
    seed: int = 0
    max_adapter_rank: int = 64
    max_adapters_per_batch: int = 8  # distinct adapters among the running rows
    max_adapters_resident: int = 16  # stacked LoRA slots preallocated (they grow if the registry holds more)
    int4_group_size: int = 64
    # the main group decodes on a static KV cache with one torch.compile'd step (hf_compiled), warmed up
    # at start-up; False: the eager path, untouched
    compile_decode: bool = False
    # OpenMP threads of inductor's C++ kernels in the compiled step (0: torch.get_num_threads()). 1: a
    # kernel never waits at a barrier for a thread another process pushed off its core (issue 27); the
    # matrix products are extern calls on ATen's threads either way
    compile_threads: int = 1

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            raise ValueError(f"hf engine serves {list(PRECISIONS)}, not {self.precision!r}")
        if self.device not in ("cpu", "cuda") and not self.device.startswith("cuda:"):
            raise ValueError(f"hf engine runs on cpu or cuda, not {self.device!r}")
        if self.max_context < 16 or self.max_concurrency < 1:
            raise ValueError("max_context >= 16 and max_concurrency >= 1 are required")
        if self.max_adapter_rank < 1 or self.max_adapters_per_batch < 1:
            raise ValueError("max_adapter_rank and max_adapters_per_batch must be >= 1")
        if self.compile_threads < 0:
            raise ValueError("compile_threads must be >= 0 (0: torch's thread count)")


def avoid_cudnn_attention(device: str) -> None:
    """On CUDA, SDPA picks cuDNN attention on Hopper, and cuDNN builds a new graph for every new KV length,
    i.e. at every decode step. Measured on an H200 (bench/hf_step.py, 8 rows): 1.5-1.8 ms of host time per
    attention call, 47 % of a step's host time, GPU busy 4 % of it. Flash/efficient SDPA have no plan to
    build. Process-wide, which is right for a server process that hosts one engine."""
    import torch

    if torch.device(device).type == "cuda":
        torch.backends.cuda.enable_cudnn_sdp(False)


def int4_backend(config: HfConfig) -> str:
    """CPU: torchao's int4 tinygemm (as fast as bf16 here); CUDA: bitsandbytes NF4, which PEFT wraps with
    every adapter method, DoRA included."""
    return "torchao" if config.device == "cpu" else "bitsandbytes-nf4"


def adapter_methods(config: HfConfig) -> tuple[str, ...]:
    # DoRA needs the dequantized base weight, which torchao's int4 tensor cannot give (hf_int4).
    if config.precision == "int4" and int4_backend(config) == "torchao":
        return ("lora", "rslora")
    return ("lora", "rslora", "dora")


class HfEngine:
    def __init__(self, model: ResolvedModel, config: HfConfig) -> None:
        self.model = model
        self.config = config
        params = count_parameters(model.path)
        self.info = EngineInfo(
            model=model.name,
            fingerprint=model.fingerprint,
            engine="hf",
            precision=config.precision,
            max_context=min(config.max_context, max_position_embeddings(model.path)),
            device=config.device,
            parameters=params,
            weight_bytes=int(params * BYTES_PER_PARAM[config.precision]),  # replaced by the measured bytes
            precisions=PRECISIONS,
            adapter_methods=adapter_methods(config),
            max_adapter_rank=config.max_adapter_rank,
            max_adapters_per_batch=config.max_adapters_per_batch,
        )
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="hf-engine")
        self._batch: Batch | None = None  # created in start()
        self._renderer: PromptRenderer | None = None
        self._tokenizer: Any = None
        self._waiting: list[Row] = []  # rows not yet admitted, in arrival order
        self._active: list[Row] = []  # rows in the batch (owned by the worker while a step runs)
        self._wake = asyncio.Event()
        self._loop_task: asyncio.Task[None] | None = None
        self._closing = False
        # probe results of adapters just added (add_adapter probes in the same worker job), kept for the
        # registry's probe_adapter call that follows: adapter key -> finite, or the probe's exception
        self._probed: dict[str, bool | Exception] = {}
        self._owner = f"hf-{id(self)}"  # its name in engine_threads(): the worker thread is claimed by it

    # --- lifecycle --------------------------------------------------------------------------------------
    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        before = engine_threads().thread_ids()
        self._batch = await loop.run_in_executor(self._executor, self._load)
        # threads torch started while the model loaded and first ran: its intra-op pool (cpu_seconds)
        engine_threads().adopt_pool(engine_threads().thread_ids() - before)
        self._renderer = PromptRenderer(self._tokenizer, self.info.max_context)
        self._loop_task = asyncio.create_task(self._run(), name="hf-engine-loop")
        self._loop_task.add_done_callback(self._on_loop_end)

    def _on_loop_end(self, task: asyncio.Task[None]) -> None:
        """The step loop ended outside shutdown(): the engine died. Every request it holds ends now
        (`unavailable`: the runner names the variant) instead of waiting on its queue for ever."""
        if self._closing:
            return
        why = "cancelled" if task.cancelled() else repr(task.exception())
        log.error("hf engine: the step loop died (%s); ending its %d requests", why, self.running())
        self._fail_held(EffllmError("unavailable", f"the hf engine's step loop died ({why})"))

    def _fail_held(self, error: EffllmError) -> None:
        for row in [*self._active, *self._waiting]:
            if not row.finished:
                row.finished = True
                row.sink.put_nowait(error)
        self._active, self._waiting = [], []

    def _load(self) -> Batch:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from .hf_batch import Batch
        from .hf_int4 import quantize_int4, weight_bytes

        engine_threads().claim(self._owner)  # on the worker: every step runs on this thread
        c = self.config
        torch.manual_seed(c.seed)
        avoid_cudnn_attention(c.device)
        self._tokenizer = AutoTokenizer.from_pretrained(self.model.path)
        dtype = getattr(torch, _DTYPES[c.precision])
        if c.precision == "int4" and int4_backend(c) == "bitsandbytes-nf4":
            from transformers import BitsAndBytesConfig

            nf4 = BitsAndBytesConfig(
                load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=dtype
            )
            model: Any = AutoModelForCausalLM.from_pretrained(  # type: ignore[call-arg]
                self.model.path, dtype=dtype, quantization_config=nf4, device_map={"": c.device}
            )
        else:
            model = AutoModelForCausalLM.from_pretrained(self.model.path, dtype=dtype)  # type: ignore[call-arg]
            if c.precision == "int4":
                quantize_int4(model, c.int4_group_size)
            model.to(c.device)
        model.eval()
        measured = weight_bytes(model)
        self.info = replace(
            self.info,
            weight_bytes=measured,
            extra={
                **self.info.extra,
                "weight_bytes": "measured",
                **({"int4": int4_backend(c)} if c.precision == "int4" else {}),
            },
        )
        log.info(
            "hf engine: %s at %s, %d weight bytes (%.3f of bf16)",
            self.model.name,
            c.precision,
            measured,
            self.info.weight_ratio_to_bf16,
        )
        eos = model.generation_config.eos_token_id
        eos_ids = {eos} if isinstance(eos, int) else set(eos or ())
        if self._tokenizer.eos_token_id is not None:
            eos_ids.add(self._tokenizer.eos_token_id)
        batch = Batch(model, eos_ids, c.device, slots=c.max_adapters_resident)
        if c.compile_decode:
            self._compile_decode(batch)
        return batch

    def _compile_decode(self, batch: Batch) -> None:
        """Build the compiled decode path and warm every batch bucket up (start() returns after: SERVING
        comes only once the graphs exist). A model the static step cannot run keeps the eager path."""
        from . import compile_cache
        from .hf_compiled import CompiledDecoder

        c = self.config
        cache = compile_cache.persist()
        try:
            decoder = CompiledDecoder(
                batch.base,
                batch.stack,
                c.device,
                c.max_concurrency,
                self.info.max_context,
                threads=c.compile_threads,
            )
        except ValueError as exc:
            log.warning("hf engine: compile_decode is off for this model (%s); decoding eagerly", exc)
            return
        t0, before = time.perf_counter(), compile_cache.counters()
        for bucket, seconds in decoder.warm_up().items():
            log.info("hf engine: compiled decode warm-up, batch bucket %d: %.1f s", bucket, seconds)
        total = time.perf_counter() - t0
        log.info(
            "hf engine: compiled decode %s, buckets %s, %d graphs, static KV cache %.0f MiB; warm-up %.1f s",
            decoder.mode,
            ",".join(map(str, decoder.buckets)),
            decoder.graphs,
            decoder.kv.nbytes / 2**20,
            total,
        )
        log.info(
            "hf engine: compile caches in %s: %s",
            cache,
            compile_cache.describe(before, compile_cache.counters()),
        )
        batch.use(decoder)
        self.info = replace(self.info, extra={**self.info.extra, "decode_warmup_s": f"{total:.1f}"})

    @property
    def info(self) -> EngineInfo:
        """With compile_decode, extra "decode" says what the main group's steps run now (compiled or
        eager) and "decode_eager_reason" why eager (compiling new adapter shapes, CPU contention...),
        read from the decoder at each call."""
        status = self._batch.main.status() if self._batch is not None else None
        if status is None:
            return self._info
        decode, reason = status
        return replace(
            self._info, extra={**self._info.extra, "decode": decode, "decode_eager_reason": reason}
        )

    @info.setter
    def info(self, value: EngineInfo) -> None:
        self._info = value

    async def shutdown(self) -> None:
        self._closing = True
        self._wake.set()
        if self._loop_task is not None:
            await asyncio.gather(self._loop_task, return_exceptions=True)
            self._loop_task = None
        self._fail_held(EffllmError("unavailable", "engine shut down"))  # else they wait on their queues
        self._executor.shutdown(wait=True)

    def running(self) -> int:
        return len(self._waiting) + len(self._active)

    def cpu_seconds(self) -> float:
        """The worker thread's CPU, plus the share of torch's intra-op (OpenMP) pool it kept busy: two hf
        variants in one process share that pool, which is divided between them by their workers' busy
        CPU time (telemetry/proctree.py EngineThreads)."""
        return engine_threads().seconds(self._owner)

    def alive(self) -> bool:
        """False once the step loop has died (the server's watchdog then turns NOT_SERVING); a loop
        that ends because of shutdown() is not a death."""
        task = self._loop_task
        return self._closing or (task is not None and not task.done())

    def prepare(self, request: GenerationRequest) -> GenerationRequest:
        if self._renderer is None:
            raise EffllmError("unavailable", "engine is not started")
        return self._renderer.prepare(request)

    # --- adapters ---------------------------------------------------------------------------------------
    async def add_adapter(self, spec: AdapterSpec) -> None:
        if spec.method not in self.info.adapter_methods:
            raise EffllmError(
                "failed_precondition",
                f"adapter {spec.key}: method {spec.method!r} is not served "
                f"by the hf engine at {self.config.precision} (it serves "
                f"{', '.join(self.info.adapter_methods)})",
            )
        if spec.rank > self.config.max_adapter_rank:
            raise EffllmError(
                "failed_precondition",
                f"adapter {spec.key}: rank {spec.rank} is over the "
                f"engine's max_adapter_rank {self.config.max_adapter_rank}",
            )
        self._probed[spec.key] = await self._on_worker(self._add_and_probe, spec, self._probe_ids())

    def _add_and_probe(self, spec: AdapterSpec, ids: list[int]) -> bool | Exception:
        """Add, then probe, in ONE worker job: each job waits for the decode step in progress, so the
        load costs one wait instead of two. A failed add raises; the probe's outcome is returned."""
        self._started_batch().add_adapter(spec)
        try:
            return self._probe(spec, ids)
        except Exception as exc:  # reported by probe_adapter, as if the probe had run there
            return exc

    async def remove_adapter(self, key: str) -> None:
        self._probed.pop(key, None)
        await self._on_worker(self._started_batch().remove_adapter, key)

    async def probe_adapter(self, spec: AdapterSpec) -> bool:
        """One token's forward on `spec` (between steps, on the worker; Batch.probe): is it finite?
        Right after add_adapter this is the probe that ran with the add (same worker job)."""
        result = self._probed.pop(spec.key, None)
        if result is None:
            result = await self._on_worker(self._probe, spec, self._probe_ids())
        if isinstance(result, Exception):
            raise result
        return bool(result)

    def _probe_ids(self) -> list[int]:
        # one token: a forward's cost grows with its tokens, and every adapted Linear runs on the first
        return list(self._tokenizer.encode("The capital of France is"))[:1]

    def _probe(self, spec: AdapterSpec, ids: list[int]) -> bool:
        return self._started_batch().probe(spec.key, ids[0])

    async def score(self, token_ids: Sequence[int]) -> list[float]:
        """Log-probabilities of `token_ids[1:]`: one base-model forward on the worker, between steps."""
        if len(token_ids) < 2:
            raise EffllmError("invalid_argument", "score: needs at least 2 tokens")
        return list(await self._on_worker(self._score, list(token_ids)))

    def _score(self, ids: list[int]) -> list[float]:
        import torch

        batch = self._started_batch()
        with torch.inference_mode():
            x = torch.tensor([ids], device=batch.device)  # [1, T]
            logits = batch.base(input_ids=x, attention_mask=torch.ones_like(x)).logits[0, :-1].float()
            logprobs = torch.log_softmax(logits, dim=-1)  # [T-1, vocab]: position t predicts ids[t+1]
            picked = logprobs.gather(1, x[0, 1:, None])[:, 0]  # [T-1]
        return [float(v) for v in picked.cpu()]

    def adapters(self) -> tuple[str, ...]:
        return tuple(self._batch.adapters) if self._batch else ()

    # --- requests ---------------------------------------------------------------------------------------
    async def generate(self, request: GenerationRequest) -> AsyncIterator[TokenEvent]:
        import torch

        from .hf_decoder import Row
        from .hf_text import TextStream

        batch = self._started_batch()
        spec = request.resolved_adapter
        if request.adapter and spec is None:
            raise EffllmError("failed_precondition", f"adapter: {request.adapter!r} is not loaded")
        if spec is not None and spec.key not in batch.adapters:
            raise EffllmError("failed_precondition", f"adapter: {spec.key} is not loaded in the engine")
        assert self._renderer is not None
        prompt_ids = self._renderer.ids(request)
        s = request.sampling
        generator = torch.Generator().manual_seed(s.seed if s.seed is not None else random.getrandbits(63))
        queue: asyncio.Queue[TokenEvent | EffllmError] = asyncio.Queue()
        row = Row(
            request.request_id,
            prompt_ids,
            s,
            spec,
            TextStream(self._tokenizer, prompt_ids, s.stop),
            generator,
            sink=queue,
        )
        self._waiting.append(row)
        self._wake.set()
        try:
            while True:
                item = await queue.get()
                if isinstance(item, EffllmError):
                    raise item
                yield item
                if item.finish_reason is not None:
                    return
        finally:
            if not row.finished:  # closed early: the loop drops the row before the next step
                row.cancelled = True
                if row in self._waiting:
                    self._waiting.remove(row)
                self._wake.set()

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        batch = self._batch
        assert batch is not None  # start() made it before this task
        while not self._closing:
            self._active = [r for r in self._active if not r.finished]
            cancelled = [r for r in self._active if r.cancelled]
            joiners = self._admit()
            if not self._active:
                self._wake.clear()
                await self._wake.wait()
                continue
            try:
                outputs = await loop.run_in_executor(self._executor, batch.step, joiners, cancelled)
            except Exception as exc:  # a failed forward: every running request ends with the error
                log.exception("hf engine step failed")
                error = (
                    exc if isinstance(exc, EffllmError) else EffllmError("internal", f"engine step: {exc}")
                )
                for row in self._active:
                    row.finished = True
                    row.sink.put_nowait(error)
                self._active = []
                await loop.run_in_executor(self._executor, batch.reset)
                continue
            for row, event in outputs:
                if not row.cancelled:
                    row.sink.put_nowait(event)
            for row in cancelled:
                row.finished = True
            await asyncio.sleep(0)  # let streams consume and new requests arrive between steps

    def _admit(self) -> list[Row]:
        """Move waiting rows into the batch while there are free slots and adapter room."""
        free = self.config.max_concurrency - len(self._active)
        adapters = {r.key for r in self._active if r.key}
        joiners: list[Row] = []
        for row in list(self._waiting):
            if free <= 0:
                break
            if row.key and row.key not in adapters and len(adapters) >= self.config.max_adapters_per_batch:
                continue  # waits until an adapter leaves the batch
            self._waiting.remove(row)
            if row.key:
                adapters.add(row.key)
            joiners.append(row)
            free -= 1
        self._active.extend(joiners)
        return joiners

    def _started_batch(self) -> Batch:
        dead = self._loop_task is not None and self._loop_task.done()  # the step loop died
        if self._batch is None or self._closing or dead:
            raise EffllmError("unavailable", "engine is not running")
        return self._batch

    async def _on_worker(self, fn: Any, *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)
