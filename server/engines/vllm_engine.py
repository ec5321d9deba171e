"""The default engine: vLLM's AsyncLLM (continuous batching, paged KV cache) in this process's event loop.

The engine core runs in a child process vLLM spawns; we talk to it through AsyncLLM, which streams
RequestOutputs in DELTA mode so each event holds only the new tokens. Aborting is explicit in `finally`
so a cancelled gRPC call frees its batch slot even if vLLM's own cleanup is skipped.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import re
import struct
import tempfile
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ...common.model import ResolvedModel, count_parameters, max_position_embeddings
from ...telemetry.proctree import ProcessTree, child_pids
from .base import (
    BYTES_PER_PARAM,
    AdapterSpec,
    EffllmError,
    EngineInfo,
    FinishReason,
    GenerationRequest,
    Precision,
    TokenEvent,
    Usage,
)
from .prompting import PromptRenderer

log = logging.getLogger(__name__)

_DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}
_FINISH: dict[str, FinishReason] = {"stop": "stop", "length": "length", "abort": "cancelled"}
_VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
_CPU_LISTS = re.compile(r"^[0-9]+(-[0-9]+)?(,[0-9]+(-[0-9]+)?)*(\|[0-9]+(-[0-9]+)?(,[0-9]+(-[0-9]+)?)*)*$")


def finish_reason(vllm_reason: str | None, request_id: str) -> FinishReason:
    """vLLM's finish reason as ours. `error` means vLLM failed that request (its docs: such a request must
    fail, not look finished): INTERNAL for this request only — the engine itself goes on serving."""
    if vllm_reason == "error":
        raise EffllmError("internal", f"request {request_id}: the engine failed this request")
    return _FINISH.get(vllm_reason or "", "stop")


@dataclass(frozen=True)
class VllmConfig:
    precision: Precision = "fp32"
    max_context: int = 2048
    max_concurrency: int = 32  # vLLM's max_num_seqs: the running batch
    kv_cache_gib: float = 1.0  # CPU backend: KV cache size (vLLM reserves it up front)
    device: str = "cpu"
    seed: int = 0
    enable_lora: bool = False
    max_lora_rank: int = 64
    max_loras: int = 8  # adapters per batch
    max_cpu_loras: int = 16
    enforce_eager: bool = True  # no torch.compile warm-up: start-up in seconds on CPU
    tensor_parallel_size: int = 1  # GPUs of one host the model is sharded over (vLLM's own TP)
    # Tokens a stream gathers before vLLM hands them on (the first goes at once): fewer RequestOutputs
    # and gRPC messages per token, for throughput over smoothness. 1: every token on its own.
    stream_interval: int = 1
    # VLLM_CPU_OMP_THREADS_BIND for the CPU worker: "nobind" (OMP_NUM_THREADS threads, unpinned),
    # "auto" (vLLM pins one thread per core and keeps one core for its scheduler and this process),
    # or CPU lists like "0-3|4-7". None: the environment's, else "nobind".
    cpu_omp_bind: str | None = None

    def __post_init__(self) -> None:
        if self.precision not in (*_DTYPES, "int4"):
            raise ValueError(f"vllm engine serves {[*_DTYPES, 'int4']}, not {self.precision!r}")
        if self.precision == "int4" and self.device == "cpu":
            raise ValueError(
                "vllm engine: int4 needs CUDA (vLLM's CPU backend has no int4 here): use --engine hf"
            )
        if self.max_context < 16 or self.max_concurrency < 1 or self.kv_cache_gib <= 0:
            raise ValueError("max_context >= 16, max_concurrency >= 1 and kv_cache_gib > 0 are required")
        if self.tensor_parallel_size < 1:
            raise ValueError(f"tensor_parallel_size {self.tensor_parallel_size} must be >= 1")
        if self.stream_interval < 1:
            raise ValueError(f"stream_interval {self.stream_interval} must be >= 1")
        bind = self.cpu_omp_bind
        if bind is not None and bind not in ("auto", "nobind") and not _CPU_LISTS.match(bind):
            raise ValueError(f"cpu_omp_bind {bind!r}: auto, nobind or CPU lists such as 0-3|4-7")


_PREQUANTIZED = ("awq", "awq_marlin", "gptq", "gptq_marlin", "compressed-tensors")


def checkpoint_quantization(model_path: Path) -> str | None:
    """The checkpoint's own quant_method (AWQ, GPTQ...) from config.json, or None for plain weights."""
    config = json.loads((model_path / "config.json").read_text())
    method = (config.get("quantization_config") or {}).get("quant_method")
    return str(method) if method else None


def quantization_args(precision: Precision, model_path: Path) -> dict[str, Any]:
    """vLLM's dtype and quantization for a precision. int4 is the checkpoint's own AWQ/GPTQ weights when it
    has them (vLLM reads their config; activations stay in the checkpoint's dtype), else bitsandbytes
    in-flight quantization of the plain checkpoint. A prequantized checkpoint serves only as int4: under
    another precision vLLM would still run it quantized, and the reported precision would be false."""
    method = checkpoint_quantization(model_path)
    if method and method not in _PREQUANTIZED:
        raise ValueError(
            f"vllm engine: checkpoint quantization {method!r} is not one of {list(_PREQUANTIZED)}"
        )
    if precision != "int4":
        if method:
            raise ValueError(f"checkpoint is quantized ({method}): serve it with --precision int4")
        return {"dtype": _DTYPES[precision], "quantization": None}
    if method:
        return {"dtype": "auto", "quantization": None}
    return {"dtype": "bfloat16", "quantization": "bitsandbytes"}


def apply_cpu_omp_bind(bind: str | None) -> str:
    """Set VLLM_CPU_OMP_THREADS_BIND (vLLM's worker reads it from this process's environment when it is
    spawned): `bind` if given, else the environment's, else "nobind". Returns the value in force."""
    if bind is not None:
        os.environ["VLLM_CPU_OMP_THREADS_BIND"] = bind
    return os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")


def engine_core_env(config: VllmConfig) -> dict[str, str]:
    """Environment for vLLM's engine-core process only. Eager on CPU: torch.compile off in it, so the one
    compiled op on our path, the rank count behind every logprobs request (vllm/v1/sample/ops/logprobs.py:
    `score`, hence every variant's start-up quality), runs eager instead of compiling C++ with Inductor at
    the first such request (minutes on a busy 2-core box, and an engine core that dies if that compile
    fails, as it can on a shared Inductor cache). Eager, the op is one comparison over [tokens, vocab]."""
    if config.device == "cpu" and config.enforce_eager:
        return {"TORCH_COMPILE_DISABLE": "1"}
    return {}


@contextlib.contextmanager
def child_environment(values: dict[str, str]) -> Iterator[None]:
    """`values` in os.environ while vLLM spawns its engine core (a spawned child inherits them), then the
    previous values back. torch._dynamo is imported first: this process has read its own setting already,
    so an hf engine in the same server (its --compile-decode) keeps torch.compile."""
    if not values:
        yield
        return
    import torch._dynamo  # noqa: F401  # reads TORCH_COMPILE_DISABLE once, at import

    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, old in saved.items():
            if old is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = old


def _vllm_rank(rank: int) -> Any:
    """vLLM sizes its LoRA buffers for one of a few ranks: the smallest that holds `rank`."""
    return next((r for r in _VLLM_LORA_RANKS if r >= rank), rank)


class VllmEngine:
    def __init__(self, model: ResolvedModel, config: VllmConfig) -> None:
        self.model = model
        self.config = config
        max_context = min(config.max_context, max_position_embeddings(model.path))
        params = count_parameters(model.path)
        self.info = EngineInfo(
            model=model.name,
            fingerprint=model.fingerprint,
            engine="vllm",
            precision=config.precision,
            max_context=max_context,
            device=config.device,
            parameters=params,
            weight_bytes=int(params * BYTES_PER_PARAM[config.precision]),
            precisions=(*_DTYPES, *(("int4",) if config.device != "cpu" else ())),  # type: ignore[arg-type]
            adapter_methods=("lora", "rslora") if config.enable_lora else (),
            max_adapter_rank=config.max_lora_rank if config.enable_lora else 0,
            max_adapters_per_batch=config.max_loras if config.enable_lora else 0,
        )
        self._quantization = quantization_args(config.precision, model.path)  # refuses before any start
        self._llm: Any = None
        self._renderer: PromptRenderer | None = None
        # LoRARequest ids: unique per NAME@VERSION for the life of the engine (never reused, so vLLM's
        # caches can never confuse a new version with an old one).
        self._lora_ids: dict[str, int] = {}
        self._next_lora_id = 2  # 1 is the null adapter (see _add_null_adapter)
        # NOTE: vLLM's CPU LoRA ops (vllm/lora/ops/torch_ops: bgmv_*) index the stacked adapter weights with
        # the row's slot, and a base row's slot is -1, i.e. the LAST slot: once every slot holds an adapter,
        # base rows decode with that adapter's weights. On CPU we therefore run base rows on an all-zero
        # adapter (the null adapter) that needs a slot of its own (one extra slot), so no row ever has
        # slot -1. The null adapter is an ordinary adapter to vLLM and must NOT be pinned: the scheduler
        # counts it among the step's max_loras distinct adapters only when a base row is in the step, so a
        # pinned one would hold a worker slot the scheduler believes free. A step of max_loras adapters
        # and no base row then evicts one of its own adapters while activating the last, and
        # punica_wrapper/utils.py convert_mapping raises KeyError: the engine core dies (issue 12).
        self._null_slots = 1 if config.enable_lora and config.device == "cpu" else 0
        self._null_lora: Any = None
        self._null_dir: tempfile.TemporaryDirectory[str] | None = None
        # the probe's outcome per adapter key, computed beside add_lora and read by probe_adapter: ""
        # (good) or the problem
        self._probed: dict[str, str] = {}
        self._core: list[ProcessTree] = []  # the processes AsyncLLM spawned (engine core, its workers)

    async def start(self) -> None:
        from transformers import AutoTokenizer
        from vllm import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM

        c = self.config
        args = AsyncEngineArgs(
            model=str(self.model.path),
            served_model_name=self.model.name,
            **self._quantization,
            max_model_len=self.info.max_context,
            max_num_seqs=c.max_concurrency,
            kv_cache_memory_bytes=int(c.kv_cache_gib * (1 << 30)),
            seed=c.seed,
            enforce_eager=c.enforce_eager,
            enable_lora=c.enable_lora,
            max_lora_rank=_vllm_rank(c.max_lora_rank),
            max_loras=c.max_loras + self._null_slots,
            # +1: a registry that loads the new version before evicting the old briefly holds one more;
            # vLLM would then drop a resident adapter from its cache and re-read it from disk mid-step
            max_cpu_loras=max(c.max_cpu_loras, c.max_loras) + self._null_slots + 1,
            disable_log_stats=True,
            tensor_parallel_size=c.tensor_parallel_size,
            stream_interval=c.stream_interval,
        )
        log.info(
            "vllm engine: enforce_eager=%s, stream_interval=%d, VLLM_CPU_OMP_THREADS_BIND=%s, "
            "OMP_NUM_THREADS=%s (under a binding, vLLM sets the worker's threads from the CPU list)",
            c.enforce_eager,
            c.stream_interval,
            apply_cpu_omp_bind(c.cpu_omp_bind),
            os.environ.get("OMP_NUM_THREADS", "unset"),
        )
        before = child_pids()  # engines start one at a time: the new children are this one's
        with child_environment(engine_core_env(c)):  # the engine core is spawned inside from_engine_args
            self._llm = await asyncio.to_thread(AsyncLLM.from_engine_args, args)
        self._core = [ProcessTree(pid) for pid in sorted(child_pids() - before)]
        if self._null_slots:
            await self._add_null_adapter()
        tokenizer = AutoTokenizer.from_pretrained(self.model.path)
        self._renderer = PromptRenderer(tokenizer, self.info.max_context)

    @property
    def renderer(self) -> PromptRenderer:
        if self._renderer is None:
            raise EffllmError("unavailable", "engine is not started")
        return self._renderer

    def alive(self) -> bool:
        """False once vLLM's engine core has died (EngineDeadError): nothing can be served any more."""
        return self._llm is not None and not self._llm.errored

    def cpu_seconds(self) -> float:
        """CPU of the engine core and its workers (the processes spawned by start(), with their children),
        where vLLM schedules and decodes. Its in-process part (detokenizing on the event loop) is shared
        with every variant and left out."""
        return sum(tree.cpu_seconds() for tree in self._core)

    def running(self) -> int:
        return int(self._llm.output_processor.get_num_unfinished_requests()) if self._llm else 0

    def prepare(self, request: GenerationRequest) -> GenerationRequest:
        return self.renderer.prepare(request)

    async def generate(self, request: GenerationRequest) -> AsyncIterator[TokenEvent]:
        from vllm import SamplingParams
        from vllm.exceptions import VLLMValidationError
        from vllm.inputs import TokensPrompt
        from vllm.sampling_params import RequestOutputKind
        from vllm.v1.engine.exceptions import EngineDeadError

        if request.adapter and request.resolved_adapter is None:
            raise EffllmError("not_found", f"adapter: {request.adapter!r} is not loaded on this server")
        lora = self._lora_request(request.resolved_adapter) if request.resolved_adapter else self._null_lora
        if self._llm is None or self._llm.errored:
            raise EffllmError("unavailable", "engine is not running")
        prompt_ids = self.renderer.ids(request)
        s = request.sampling
        try:
            params = SamplingParams(
                max_tokens=s.max_new_tokens,
                temperature=s.temperature,
                top_p=s.top_p,
                top_k=s.top_k if s.top_k > 0 else -1,
                seed=s.seed,
                stop=list(s.stop) or None,
                repetition_penalty=s.repetition_penalty,
                ignore_eos=s.ignore_eos,
                output_kind=RequestOutputKind.DELTA,
            )
        except VLLMValidationError as exc:  # vLLM's own bounds (e.g. temperature <= 2) beyond ours
            raise EffllmError("invalid_argument", f"sampling: {exc}") from exc
        finished = False
        produced = 0
        try:
            stream = self._llm.generate(
                TokensPrompt(prompt_token_ids=prompt_ids), params, request.request_id, lora_request=lora
            )
            async for out in stream:
                completion = out.outputs[0]
                produced += len(completion.token_ids)
                if out.finished:
                    finished = True
                    yield TokenEvent(
                        text=completion.text,
                        token_ids=tuple(completion.token_ids),
                        finish_reason=finish_reason(completion.finish_reason, request.request_id),
                        usage=Usage(input_tokens=len(prompt_ids), output_tokens=produced),
                    )
                    return
                if completion.token_ids or completion.text:
                    yield TokenEvent(text=completion.text, token_ids=tuple(completion.token_ids))
        except EngineDeadError as exc:  # retryable elsewhere: the server's other variants serve on
            raise EffllmError("unavailable", "vLLM's engine core died") from exc
        finally:
            if not finished:
                await self._llm.abort(request.request_id)

    def _lora_request(self, spec: AdapterSpec) -> Any:
        from vllm.lora.request import LoRARequest

        lora_id = self._lora_ids.get(spec.key)
        if lora_id is None:
            raise EffllmError("not_found", f"adapter: {spec.key} is not loaded in the engine")
        return LoRARequest(lora_name=spec.key, lora_int_id=lora_id, lora_path=str(spec.path))

    async def add_adapter(self, spec: AdapterSpec) -> None:
        """Check the adapter with vLLM's own PEFT rules in this process first: an adapter vLLM refuses
        (DoRA, LoRA bias, modules_to_save...) must never reach the engine core, where it can kill it."""
        from vllm.lora.peft_helper import PEFTHelper

        if not self.config.enable_lora:
            raise EffllmError("failed_precondition", "adapters: this engine was started without LoRA support")
        if spec.method not in self.info.adapter_methods:
            raise EffllmError("failed_precondition", f"method: vLLM does not serve {spec.method} adapters")
        try:
            helper = PEFTHelper.from_local_dir(str(spec.path), max_position_embeddings=self.info.max_context)
            errors = helper._validate_features()
            if helper.bias != "none":
                errors.append(f"LoRA bias {helper.bias!r} is not supported.")
        except Exception as exc:
            message = f"adapter_config.json: vLLM cannot read it ({exc})"
            raise EffllmError("failed_precondition", message) from exc
        if errors:
            raise EffllmError("failed_precondition", f"adapter: {' '.join(errors)}")
        if spec.key in self._lora_ids:
            return
        lora_id = self._next_lora_id
        self._next_lora_id += 1
        self._lora_ids[spec.key] = lora_id
        # the probe's check runs in a thread of this process while the engine core loads the adapter
        check = asyncio.ensure_future(asyncio.to_thread(self._delta_problem, spec))
        try:
            await self._llm.add_lora(self._lora_request(spec))
        except BaseException:
            del self._lora_ids[spec.key]
            await asyncio.gather(check, return_exceptions=True)
            raise
        self._probed[spec.key] = await check

    def _delta_problem(self, spec: AdapterSpec) -> str:
        import torch

        from .lora_delta import delta_problem, lora_scale

        dtype = getattr(torch, _DTYPES.get(self.config.precision, "bfloat16"))
        return delta_problem(spec.path, lora_scale(spec.method, spec.rank, spec.alpha), dtype)

    async def probe_adapter(self, spec: AdapterSpec) -> bool:
        """True when every adapted module's update on a probe input is finite and bounded (lora_delta);
        raises EffllmError naming the module otherwise. Right after add_adapter this is the check that
        ran beside vLLM's add_lora; it reads the snapshot in this process, never the engine core.

        NOTE: until issue 28 this was a 1-token greedy generate on `spec` reading its logprobs: one step
        of the engine core (50-100 ms on CPU, its worker on one torch thread) on top of the load, which
        kept LoadAdapter over its 50 ms budget. The registry's scan refuses NaN/inf weights; what the
        forward caught beyond it, finite weights whose products overflow, this check sees too."""
        problem = self._probed.pop(spec.key, None)
        if problem is None:
            problem = await asyncio.to_thread(self._delta_problem, spec)
        if problem:
            raise EffllmError("failed_precondition", problem)
        return True

    async def score(self, token_ids: Sequence[int]) -> list[float]:
        """Log-probabilities of `token_ids[1:]` from vLLM's `prompt_logprobs` (max_tokens=1), on the base
        model (the null adapter on CPU, which changes nothing). NOTE: on CPU the first logprobs request
        would compile vLLM's logprobs op with Inductor, but an eager engine core runs
        it eager (engine_core_env); the server only scores when it hosts several variants."""
        import uuid

        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt
        from vllm.sampling_params import RequestOutputKind

        ids = list(token_ids)
        if len(ids) < 2:
            raise EffllmError("invalid_argument", "score: needs at least 2 tokens")
        if self._llm is None:
            raise EffllmError("unavailable", "engine is not running")
        params = SamplingParams(
            max_tokens=1, temperature=0.0, prompt_logprobs=0, output_kind=RequestOutputKind.FINAL_ONLY
        )
        values: list[float] = []
        async for out in self._llm.generate(
            TokensPrompt(prompt_token_ids=ids),
            params,
            f"score-{uuid.uuid4().hex}",
            lora_request=self._null_lora,
        ):
            if out.finished:
                # prompt_logprobs[t]: {token id: Logprob} for position t (None at t = 0); the prompt's own
                # token is always among them
                values = [
                    float(step[tok].logprob)
                    for tok, step in zip(ids[1:], (out.prompt_logprobs or [])[1:], strict=False)
                ]
        if len(values) != len(ids) - 1:
            raise EffllmError("internal", f"score: vLLM returned {len(values)} of {len(ids) - 1} logprobs")
        return values

    async def _add_null_adapter(self) -> None:
        """A rank-1 LoRA of zeros on one q_proj: it changes nothing, but it gives base rows a slot."""
        from safetensors.torch import save_file
        from torch import zeros
        from vllm.lora.request import LoRARequest

        module, (out_dim, in_dim) = _first_module(self.model.path, "q_proj")
        self._null_dir = tempfile.TemporaryDirectory(prefix="effllm-null-lora-")
        folder = Path(self._null_dir.name)
        config = {
            "peft_type": "LORA",
            "r": 1,
            "lora_alpha": 1,
            "target_modules": ["q_proj"],
            "bias": "none",
            "task_type": "CAUSAL_LM",
            "base_model_name_or_path": str(self.model.path),
        }
        (folder / "adapter_config.json").write_text(json.dumps(config))
        prefix = f"base_model.model.{module}"
        save_file(
            {f"{prefix}.lora_A.weight": zeros(1, in_dim), f"{prefix}.lora_B.weight": zeros(out_dim, 1)},
            str(folder / "adapter_model.safetensors"),
            metadata={"format": "pt"},
        )
        self._null_lora = LoRARequest(lora_name="__base__", lora_int_id=1, lora_path=str(folder))
        await self._llm.add_lora(self._null_lora)  # not pinned: see __init__

    async def remove_adapter(self, key: str) -> None:
        self._probed.pop(key, None)
        lora_id = self._lora_ids.pop(key, None)
        if lora_id is not None and self._llm is not None:
            await self._llm.remove_lora(lora_id)

    async def shutdown(self) -> None:
        if self._llm is not None:
            self._llm.shutdown()
            self._llm = None
        if self._null_dir is not None:
            self._null_dir.cleanup()
            self._null_dir = None


def _first_module(path: Path, suffix: str) -> tuple[str, tuple[int, int]]:
    """Name and [out, in] shape of the first `*.{suffix}` linear weight in the checkpoint's headers."""
    for file in sorted(path.glob("*.safetensors")):
        with file.open("rb") as fh:
            (n,) = struct.unpack("<Q", fh.read(8))
            header = json.loads(fh.read(n))
        for key, meta in header.items():
            if key.endswith(f".{suffix}.weight") and len(meta["shape"]) == 2:
                return key[: -len(".weight")], (int(meta["shape"][0]), int(meta["shape"][1]))
    raise EffllmError("failed_precondition", f"base model has no {suffix} weight to attach a null adapter to")
