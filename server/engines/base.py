"""The engine boundary: plain dataclasses in, a stream of TokenEvents out.

Everything above this module (service, admission) is free of torch; everything below it may use it.
An engine reports what it can do in `EngineInfo`; the service refuses the rest before it reaches here.
Invariant: the runner calls `prepare` (render + length check, tokenizer only) before a request takes a
slot, and `generate` only with a prepared request; `Engine` lists everything the server calls on an engine.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Protocol

from ...api.errors import EffllmError as EffllmError
from ...api.errors import ErrorCode as ErrorCode

Precision = Literal["fp32", "bf16", "fp16", "int4"]
PRECISIONS: tuple[Precision, ...] = ("fp32", "bf16", "fp16", "int4")
BYTES_PER_PARAM: dict[str, float] = {"fp32": 4.0, "bf16": 2.0, "fp16": 2.0, "int4": 0.5}

FinishReason = Literal["length", "stop", "cancelled", "error"]


@dataclass(frozen=True)
class ChatTurn:
    role: str
    content: str


@dataclass(frozen=True)
class Sampling:
    max_new_tokens: int
    temperature: float = 1.0  # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 = off
    seed: int | None = None
    stop: tuple[str, ...] = ()
    repetition_penalty: float = 1.0
    ignore_eos: bool = False  # decode to max_new_tokens (stop strings still apply)


AdapterMethod = Literal["lora", "rslora", "dora"]


@dataclass(frozen=True)
class AdapterSpec:
    """A validated adapter version on disk (PEFT format), ready for an engine to load."""

    name: str
    version: str
    path: Path
    method: AdapterMethod
    rank: int
    alpha: float
    target_modules: tuple[str, ...]
    # sha256 of adapter_config.json + adapter_model.safetensors (common/manifest.py content_hash): the
    # version's identity; "" when the caller did not hash it (benchmarks, engine tests).
    content_sha256: str = ""

    @property
    def key(self) -> str:
        return f"{self.name}@{self.version}"


@dataclass(frozen=True)
class GenerationRequest:
    request_id: str
    sampling: Sampling
    prompt: str | None = None
    messages: tuple[ChatTurn, ...] | None = None
    adapter: str = ""  # as the client named it: "" base, NAME or NAME@VERSION
    # Set by the adapter registry before the engine sees the request: the exact version to run on.
    resolved_adapter: AdapterSpec | None = None
    # The server's --max-prompt-tokens (0: only the context bounds the prompt); checked after rendering.
    max_prompt_tokens: int = 0
    # Set by Engine.prepare before admission: the rendered prompt, already checked against the limits.
    prompt_ids: tuple[int, ...] | None = None


@dataclass(frozen=True)
class Usage:
    input_tokens: int
    output_tokens: int
    # Set by the runner from telemetry: this request's attributed energy and the meter's source.
    energy_joules: float | None = None
    energy_source: str = ""


@dataclass(frozen=True)
class Timings:
    queue_s: float
    time_to_first_token_s: float
    decode_s: float
    total_s: float


@dataclass(frozen=True)
class TokenEvent:
    """New text since the last event; the last event of a request has `finish_reason` and `usage`."""

    text: str
    token_ids: tuple[int, ...]
    finish_reason: FinishReason | None = None
    usage: Usage | None = None
    timings: Timings | None = None  # filled by the runner, which owns the clock
    adapter: str = ""  # NAME@VERSION actually used


@dataclass(frozen=True)
class EngineInfo:
    model: str
    fingerprint: str
    engine: str
    precision: Precision
    max_context: int
    device: str
    parameters: int
    weight_bytes: int
    precisions: tuple[Precision, ...]
    adapter_methods: tuple[str, ...] = ()
    max_adapter_rank: int = 0
    max_adapters_per_batch: int = 0
    extra: dict[str, str] = field(default_factory=dict)

    @property
    def weight_ratio_to_bf16(self) -> float:
        return self.weight_bytes / (self.parameters * BYTES_PER_PARAM["bf16"]) if self.parameters else 0.0


class Engine(Protocol):
    info: EngineInfo

    async def start(self) -> None:
        """Load the model; the server reports SERVING only after this returns."""

    def alive(self) -> bool:
        """False once the engine can serve nothing again (its loop or engine core died); polled by the
        server's watchdog, which then turns health NOT_SERVING and exits non-zero."""
        ...

    def prepare(self, request: GenerationRequest) -> GenerationRequest:
        """The request with `prompt_ids` set: rendered and length-checked with the tokenizer only (cheap, no
        model), so a bad prompt is refused (EffllmError invalid_argument / failed_precondition) before the
        request takes a slot."""
        ...

    def generate(self, request: GenerationRequest) -> AsyncIterator[TokenEvent]:
        """Stream the request's tokens. Closing the iterator early aborts the request and frees its slot."""
        ...

    def running(self) -> int:
        """Requests the engine still holds (scheduled or waiting inside it)."""
        ...

    async def add_adapter(self, spec: AdapterSpec) -> None:
        """Make `spec.key` servable; raise EffllmError("failed_precondition") if this engine cannot."""

    async def remove_adapter(self, key: str) -> None:
        """Forget `key`; only called once no request runs on it."""

    async def score(self, token_ids: Sequence[int]) -> list[float]:
        """Natural-log probability of each of `token_ids[1:]` given the ids before it, on this engine's own
        weights and kernels (one forward; the base model, no adapter): len(token_ids) - 1 values. The
        server's per-variant quality figure (perplexity on common/heldout.py) comes from it."""
        ...

    def cpu_seconds(self) -> float:
        """This engine's own CPU seconds so far: its processes and threads, never a neighbour's (another
        variant's engine spinning beside it). The start-up J/token estimate is its difference over a run."""
        ...

    async def shutdown(self) -> None: ...


class AdapterHost(Protocol):
    """What the adapter registry needs of the engine(s) it loads into: one Engine, or every variant of a
    server with several (server/variants.py VariantAdapters)."""

    @property
    def info(self) -> EngineInfo: ...

    async def add_adapter(self, spec: AdapterSpec) -> None: ...

    async def remove_adapter(self, key: str) -> None: ...


class AdapterProbe(Protocol):
    """Optional engine method: the registry calls it after `add_adapter` and before the version becomes
    routable; an engine without it is trusted (validation already refused non-finite files)."""

    async def probe_adapter(self, spec: AdapterSpec) -> bool:
        """True when `spec` passes the engine's numeric check (the hf engine: one token's forward on
        it is finite; vLLM: lora_delta). False, or EffllmError whose message says what is wrong (the
        registry puts it in its refusal), when it does not."""
        ...
