"""GenerationService: validate, map proto -> GenerationRequest, map errors -> gRPC status. No torch here.

Every refusal names the field and the reason, and happens before the request takes a slot: the fields here
(`to_request`), the rendered prompt's length and the adapter in the runner, before admission.
"""

from __future__ import annotations

import asyncio
import logging
import math
import re
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, NoReturn

import grpc

from ..api.objectives import OBJECTIVES, objective_name
from ..api.refs import is_ref
from ..api.status import STATUS
from ..api.v1 import generation_pb2 as pb
from ..api.v1 import generation_pb2_grpc as pb_grpc
from ..common.architecture import Architecture
from ..common.auth import AuthConfig, caller_role
from ..common.budget import WIRE_FIELDS, Budget
from ..telemetry.genai import mark_error
from .defaults import SamplingDefaults
from .engines.base import ChatTurn, EffllmError, GenerationRequest, Sampling, TokenEvent
from .models import ModelHost, Models
from .runner import Runner
from .telemetry_rpc import telemetry_reply
from .variants import Variant, VariantSet

if TYPE_CHECKING:
    from ..telemetry.serving import ServerTelemetry as TelemetrySource

log = logging.getLogger("effllm.server")
_timeout_at = getattr(asyncio, "timeout_at", None)  # Python >= 3.11

FINISH = {
    "length": pb.FINISH_REASON_LENGTH,
    "stop": pb.FINISH_REASON_STOP,
    "cancelled": pb.FINISH_REASON_CANCELLED,
    "error": pb.FINISH_REASON_ERROR,
}
ROLES = ("system", "user", "assistant")
_REQUEST_ID = re.compile(r"^[\x21-\x7e]{1,128}$")


@dataclass(frozen=True)
class Limits:
    """Per-request limits; each refusal names the limit (see docs/security.md for the full list)."""

    default_max_new_tokens: int = 128
    max_new_tokens: int = 4096
    max_stop_strings: int = 16
    max_stop_chars: int = 256  # per stop string
    # Checked on the raw text before tokenizing, so a huge prompt costs no tokenizer time.
    max_prompt_chars: int = 200_000
    # Checked on the rendered prompt; 0: only the context (max_context - max_new_tokens) bounds it.
    max_prompt_tokens: int = 0
    # A request runs at most this long whatever deadline the client sent (or none): DEADLINE_EXCEEDED after.
    max_request_s: float = 600.0

    def __post_init__(self) -> None:
        if self.default_max_new_tokens < 1 or self.max_new_tokens < 1:
            raise ValueError("default_max_new_tokens and max_new_tokens must be >= 1")
        if self.max_prompt_chars < 1 or self.max_prompt_tokens < 0 or self.max_stop_chars < 1:
            raise ValueError(
                "max_prompt_chars >= 1, max_prompt_tokens >= 0 and max_stop_chars >= 1 are required"
            )
        if not (math.isfinite(self.max_request_s) and self.max_request_s > 0):
            raise ValueError(f"max_request_s {self.max_request_s} must be a finite number > 0")


def to_request(
    msg: pb.GenerateRequest,
    limits: Limits,
    max_context: int,
    defaults: SamplingDefaults = SamplingDefaults(),  # noqa: B008 (frozen, so one shared instance is safe)
) -> GenerationRequest:
    """Raises EffllmError("invalid_argument") naming the first bad field. Unset sampling fields take
    `defaults` (the model's generation_config); an explicit 0 temperature is still greedy."""
    which = msg.WhichOneof("input")
    prompt: str | None = None
    messages: tuple[ChatTurn, ...] | None = None
    if which is None:
        _bad("input: set either prompt or messages")
    elif which == "prompt":
        if not msg.prompt.strip():
            _bad("prompt: is empty")
        prompt = msg.prompt
        if len(prompt) > limits.max_prompt_chars:
            _bad(
                f"prompt: {len(prompt)} characters is over this server's limit of "
                f"max_prompt_chars={limits.max_prompt_chars}"
            )
    else:
        if not msg.messages.messages:
            _bad("messages: is empty")
        for i, turn in enumerate(msg.messages.messages):
            if turn.role not in ROLES:
                _bad(f"messages[{i}].role: {turn.role!r} is not one of {', '.join(ROLES)}")
        chars = sum(len(t.content) for t in msg.messages.messages)
        if chars > limits.max_prompt_chars:
            _bad(
                f"messages: {chars} characters is over this server's limit of "
                f"max_prompt_chars={limits.max_prompt_chars}"
            )
        messages = tuple(ChatTurn(t.role, t.content) for t in msg.messages.messages)

    s = msg.sampling
    max_new = s.max_new_tokens or min(limits.default_max_new_tokens, limits.max_new_tokens)
    if s.max_new_tokens < 0:
        _bad(f"sampling.max_new_tokens: {s.max_new_tokens} must be > 0")
    if max_new >= max_context:
        _bad(f"sampling.max_new_tokens: {max_new} must be below the context of {max_context} tokens")
    if max_new > limits.max_new_tokens:
        _bad(
            f"sampling.max_new_tokens: {max_new} is over this server's limit of {limits.max_new_tokens} "
            "(max_new_tokens)"
        )
    temperature = s.temperature if s.HasField("temperature") else defaults.temperature
    if not math.isfinite(temperature) or temperature < 0:
        _bad(f"sampling.temperature: {temperature} must be a finite number >= 0")
    top_p = s.top_p if s.HasField("top_p") else defaults.top_p
    if not (0.0 < top_p <= 1.0):
        _bad(f"sampling.top_p: {top_p} must be in (0, 1]")
    top_k = s.top_k if s.HasField("top_k") else defaults.top_k
    if top_k < 0:
        _bad(f"sampling.top_k: {top_k} must be >= 0 (0 disables it)")
    penalty = s.repetition_penalty if s.HasField("repetition_penalty") else defaults.repetition_penalty
    if not math.isfinite(penalty) or penalty <= 0:
        _bad(f"sampling.repetition_penalty: {penalty} must be a finite number > 0")
    if len(s.stop) > limits.max_stop_strings:
        _bad(f"sampling.stop: {len(s.stop)} strings, at most {limits.max_stop_strings}")
    if any(not stop for stop in s.stop):
        _bad("sampling.stop: empty stop string")
    if any(len(stop) > limits.max_stop_chars for stop in s.stop):
        _bad(f"sampling.stop: a stop string is over max_stop_chars={limits.max_stop_chars}")
    if msg.adapter and not is_ref(msg.adapter):
        _bad(f"adapter: {msg.adapter[:80]!r} is not NAME or NAME@VERSION (letters, digits, . _ -)")
    if msg.request_id and not _REQUEST_ID.match(msg.request_id):
        _bad("request_id: 1-128 printable ASCII characters without spaces")

    return GenerationRequest(
        request_id=msg.request_id or uuid.uuid4().hex,
        prompt=prompt,
        messages=messages,
        adapter=msg.adapter,
        sampling=Sampling(
            max_new_tokens=max_new,
            temperature=temperature,
            top_p=top_p,
            top_k=top_k,
            seed=s.seed if s.HasField("seed") else None,
            stop=tuple(s.stop),
            repetition_penalty=penalty,
            ignore_eos=s.ignore_eos,
        ),
        max_prompt_tokens=limits.max_prompt_tokens,
    )


def _bad(message: str) -> NoReturn:
    raise EffllmError("invalid_argument", message)


def to_route(msg: pb.GenerateRequest) -> tuple[str, Budget]:
    """(objective, budget) of a request: "" = the server's default objective. Raises invalid_argument
    naming the field: an unknown objective number, a budget figure that is not finite, negative (a zero
    time or energy limit can be met by nothing) or a min_quality outside 0..1."""
    objective = objective_name(msg.objective)
    if objective is None:
        _bad(f"objective: {msg.objective} is not a known Objective (0-{len(OBJECTIVES)})")
    if not msg.HasField("budget"):
        return objective, Budget()
    b = msg.budget
    values: dict[str, float | None] = {}
    for name, wire in WIRE_FIELDS.items():
        if not b.HasField(wire):
            values[name] = None
            continue
        value = getattr(b, wire)
        if wire == "min_quality":
            if not (math.isfinite(value) and 0 <= value <= 1):
                _bad(f"budget.min_quality: {value} must be in 0..1 (relative to the best variant)")
        elif not math.isfinite(value) or value <= 0:
            _bad(f"budget.{wire}: {value} must be a finite number > 0")
        values[name] = value
    return objective, Budget(**values)


def model_info(
    variants: VariantSet,
    limits: Limits | None = None,
    defaults: SamplingDefaults | None = None,
    chat_template: bool = False,
    host: ModelHost | None = None,
) -> pb.ModelInfo:
    """The server's top-level figures are its default variant's; `variants` lists each one
    (`variant_info`), the default included, so both read the same engine and runner. `host`: the model's
    name on the server and its architecture."""
    d, lim = defaults or SamplingDefaults(), limits or Limits()
    info, runner = variants.default.engine.info, variants.default.runner
    arch = host.architecture if host is not None else None
    return pb.ModelInfo(
        name=host.name if host is not None else info.model,
        architecture=_architecture_info(arch, info.parameters, host) if arch is not None else None,
        model=info.model,
        fingerprint=info.fingerprint,
        engine=info.engine,
        precision=info.precision,
        max_context=info.max_context,
        capabilities=pb.Capabilities(
            precisions=list(info.precisions),
            adapter_methods=list(info.adapter_methods),
            max_adapter_rank=info.max_adapter_rank,
            max_adapters_per_batch=info.max_adapters_per_batch,
        ),
        weight_bytes=info.weight_bytes,
        weight_ratio_to_bf16=info.weight_ratio_to_bf16,
        device=info.device,
        parameters=info.parameters,
        max_concurrency=runner.max_concurrency,
        queue_size=runner.queue_size,
        sampling_defaults=pb.SamplingDefaults(
            temperature=d.temperature,
            top_p=d.top_p,
            top_k=d.top_k,
            repetition_penalty=d.repetition_penalty,
            max_new_tokens=min(lim.default_max_new_tokens, lim.max_new_tokens),
            from_model=list(d.from_model),
        ),
        chat_template=chat_template,
        variants=[variant_info(v) for v in variants.variants],
    )


def _architecture_info(arch: Architecture, parameters: int, host: ModelHost | None) -> pb.ArchitectureInfo:
    return pb.ArchitectureInfo(
        model_type=arch.model_type,
        family=arch.family,
        attention=arch.attention,
        layers=arch.layers,
        heads=arch.heads,
        kv_heads=arch.kv_heads,
        experts=arch.experts,
        top_k=arch.top_k,
        ssm=arch.ssm,
        active_parameters=arch.active_parameters(parameters),
        kv_cache_bytes_per_token=host.kv_bytes_per_token() if host is not None else 0,
        random_init=arch.random_init,
    )


def variant_info(v: Variant) -> pb.VariantInfo:
    info, f = v.engine.info, v.figures

    def spread(name: str) -> pb.FigureSpread:
        s = f.spread(name)
        return pb.FigureSpread(median=s.median, low=s.lo, high=s.hi, samples=s.samples)

    return pb.VariantInfo(
        name=v.name,
        precision=info.precision,
        engine=info.engine,
        weight_bytes=info.weight_bytes,
        perplexity=v.perplexity,
        quality=v.quality,
        live=pb.VariantFigures(
            time_to_first_token_s=f.ttft_s,
            time_per_output_token_s=f.tpot_s,
            joules_per_token=f.j_per_token,
            energy_source=f.energy_source,
            queue_depth=v.runner.queued,
            running=v.runner.running,
            requests=f.requests,
            time_to_first_token=spread("ttft_s"),
            time_per_output_token=spread("tpot_s"),
            joules=spread("j_per_token"),
            newest_sample_age_s=time.monotonic() - f.newest_s if f.newest_s else 0.0,
        ),
        adapter_methods=list(info.adapter_methods),
        state=pb.VARIANT_STATE_SERVING if v.alive else pb.VARIANT_STATE_DEAD,
        explored=v.explored,
        engine_state=dict(info.extra),
    )


class GenerationService(pb_grpc.GenerationServiceServicer):
    """`variants`: the server's VariantSet, or one Runner (a server with a single variant); `models`: the
    hosted models when the server hosts several (server/models.py; the first's variants are `variants`)."""

    def __init__(
        self,
        variants: VariantSet | Runner,
        limits: Limits,
        defaults: SamplingDefaults | None = None,
        chat_template: bool = False,
        telemetry: TelemetrySource | None = None,
        auth: AuthConfig | None = None,
        max_reply_bytes: int = 16 << 20,
        models: Models | None = None,
        stream_interval: int = 1,
    ) -> None:
        if isinstance(variants, Runner):
            variants = VariantSet([Variant(variants.engine, variants)])
        self.variants = variants
        self.models = models  # None: one model, `variants`
        self.runner = variants.default.runner  # the default variant's (its engine answers model questions)
        self.limits = limits
        self.defaults = defaults or SamplingDefaults()
        self.chat_template = chat_template
        self.telemetry = telemetry  # answers GetTelemetry; None: the server runs without telemetry
        self.auth = auth or AuthConfig()  # who sees per-request telemetry (the interceptor does the rest)
        self.max_reply_bytes = max_reply_bytes  # the server's message cap (GetTelemetry refuses past it)
        self.stream_interval = stream_interval  # tokens per GenerateStream message (after the first)
        self._telemetry_turn = asyncio.Lock()
        self.ready = False  # set once the engine has started
        self.draining = False

    async def _events(
        self, msg: pb.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[tuple[GenerationRequest, TokenEvent, Variant, bool | None]]:
        if not self.ready or self.draining:
            await context.abort(
                grpc.StatusCode.UNAVAILABLE, "server is draining" if self.draining else "model is loading"
            )
        cap = self.limits.max_request_s
        try:
            variants, defaults = self.variants, self.defaults
            host = self._host(msg.model if msg.HasField("model") else None)
            if host is not None:
                variants, defaults = host.variants, host.sampling_defaults
            request = to_request(msg, self.limits, variants.default.engine.info.max_context, defaults)
            objective, budget = to_route(msg)
            if host is not None and self.models is not None:
                self.models.check_adapter(host, request.adapter)
            # NOTE: choosing (which peeks at the adapter's version) and the runner's lease on that version
            # happen in one event-loop step on Python >= 3.11 (_bounded's timeout_at): no load or unload slips
            # between them (on 3.10 a version swapped in between is refused by the engine, never mixed up).
            variant, note, met = variants.choose(objective, budget, request.adapter, msg.strict_budget)
            async for event in _bounded(variant.runner.run(request, note), cap):
                yield request, event, variant, met
        except EffllmError as err:
            mark_error(err.code, err.message)  # the request's span (if traced) says why it failed
            await context.abort(STATUS[err.code], err.message)
        except asyncio.TimeoutError:
            await context.abort(
                grpc.StatusCode.DEADLINE_EXCEEDED,
                f"request ran past this server's limit of max_request_s={cap:g}",
            )
        except grpc.aio.AbortError:
            raise
        except Exception as err:
            # NOTE: an engine fault on one request ends that request only; the engine aborts it and frees its
            # slot (the runner's finally), the rest of the batch goes on. INTERNAL says the fault is ours.
            log.exception("request failed in the engine")
            await context.abort(
                grpc.StatusCode.INTERNAL, f"engine failed on this request: {type(err).__name__}"
            )

    def _host(self, name: str | None) -> ModelHost | None:
        """The request's model (None: the default); NOT_FOUND naming `model` for one not hosted. None on
        a service built without `models` (one model: `self.variants`)."""
        if self.models is None:
            if name:  # a one-model service answers to its own name only
                info = self.variants.default.engine.info
                if name != info.model:
                    hosted = f"(hosted: {info.model})"
                    raise EffllmError("not_found", f"model: {name[:80]!r} is not hosted here {hosted}")
            return None
        return self.models.get(name)

    def _model_name(self, variant: Variant) -> str:
        """The name of the hosted model `variant` belongs to (what requests put in `model`)."""
        if self.models is not None:
            for host in self.models:
                if variant in host.variants.variants:
                    return host.name
        return variant.engine.info.model

    async def Generate(
        self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> pb.GenerateResponse:
        reply = pb.GenerateResponse()
        async for req, event, variant, met in self._events(request, context):
            reply.request_id = req.request_id
            reply.text += event.text
            reply.token_ids.extend(event.token_ids)
            if event.finish_reason is not None:
                reply.finish_reason = FINISH[event.finish_reason]
                reply.adapter = event.adapter
                reply.variant = variant.name
                reply.model = self._model_name(variant)
                if met is not None:
                    reply.budget_met = met
                _fill_final(reply.usage, reply.timings, event)
        return reply

    async def GenerateStream(
        self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.GenerateStreamResponse]:
        held: list[TokenEvent] = []  # events not sent yet (stream_interval > 1): never the first token's
        held_tokens, sent_first = 0, False
        async for req, event, variant, met in self._events(request, context):
            held.append(event)
            held_tokens += len(event.token_ids)
            if (
                self.stream_interval > 1
                and sent_first
                and event.finish_reason is None
                and held_tokens < self.stream_interval
            ):
                continue
            events, held = held, []
            sent_first, held_tokens = sent_first or held_tokens > 0, 0
            out = pb.GenerateStreamResponse(
                request_id=req.request_id,
                text="".join(e.text for e in events),
                token_ids=[t for e in events for t in e.token_ids],
            )
            if event.finish_reason is not None:
                out.final.finish_reason = FINISH[event.finish_reason]
                out.final.adapter = event.adapter
                out.final.variant = variant.name
                out.final.model = self._model_name(variant)
                if met is not None:
                    out.final.budget_met = met
                _fill_final(out.final.usage, out.final.timings, event)
            yield out

    async def GetModelInfo(
        self, request: pb.GetModelInfoRequest, context: grpc.aio.ServicerContext
    ) -> pb.ModelInfo:
        if not self.ready:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "model is loading")
        try:
            host = self._host(request.model if request.HasField("model") else None)
        except EffllmError as err:
            await context.abort(STATUS[err.code], err.message)
        return self._model_info(host)

    def _model_info(self, host: ModelHost | None) -> pb.ModelInfo:
        if host is None:
            return model_info(self.variants, self.limits, self.defaults, self.chat_template)
        return model_info(host.variants, self.limits, host.sampling_defaults, host.chat_template, host)

    async def ListModels(
        self, request: pb.ListModelsRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListModelsResponse:
        if not self.ready:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "model is loading")
        hosts: list[ModelHost | None] = list(self.models) if self.models is not None else [None]
        return pb.ListModelsResponse(models=[self._model_info(h) for h in hosts])

    async def GetTelemetry(
        self, request: pb.GetTelemetryRequest, context: grpc.aio.ServicerContext
    ) -> pb.Telemetry:
        start, end, now = request.start_unix_s, request.end_unix_s, time.time()
        if not (math.isfinite(start) and math.isfinite(end)) or start < 0 or end < 0:
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT, "start_unix_s, end_unix_s: finite, >= 0 (0: open end)"
            )
        if start > (end or now):
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"start_unix_s: {start} is after end_unix_s ({end:.3f})"
                if end
                else f"start_unix_s: {start} is after now ({now:.3f}; end_unix_s 0 means now)",
            )
        # Per-request figures and adapter names are tenants' data: the admin role's only (docs/security.md).
        full = caller_role(self.auth, context.invocation_metadata()) == "admin"
        info = self.runner.engine.info
        try:
            # Off the event loop: summarising a long history must not stall the streams; one at a time, so
            # callers that pile up wait their turn instead of sharing the GIL with the streams.
            async with self._telemetry_turn:
                return await asyncio.to_thread(
                    telemetry_reply,
                    self.telemetry,
                    request,
                    info.model,
                    info.precision,
                    info.engine,
                    now=now,
                    full=full,
                    max_bytes=self.max_reply_bytes,
                )
        except EffllmError as err:
            await context.abort(STATUS[err.code], err.message)

    async def GetStats(
        self, request: pb.GetStatsRequest, context: grpc.aio.ServicerContext
    ) -> pb.ServerStats:
        if self.models is not None:
            runners = [v.runner for _, v in self.models.variants()]
        else:
            runners = [v.runner for v in self.variants.variants]
        return pb.ServerStats(
            running=sum(r.running for r in runners),
            queued=sum(r.queued for r in runners),
            engine_running=sum(r.engine.running() for r in runners) if self.ready else 0,
            requests_total=sum(r.counters.requests_total for r in runners),
            requests_cancelled=sum(r.counters.requests_cancelled for r in runners),
            requests_rejected=sum(r.counters.requests_rejected for r in runners),
            output_tokens_total=sum(r.counters.output_tokens_total for r in runners),
        )


async def _bounded(events: AsyncIterator[TokenEvent], seconds: float) -> AsyncIterator[TokenEvent]:
    """`events`, but raise TimeoutError once `seconds` have passed in total. The timeout cancels the pending
    step inside the generator, whose own cleanup (engine abort, slot release) then runs."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + seconds
    it = aiter(events)
    try:
        while True:
            try:
                # NOTE: asyncio.timeout_at keeps each step in this task (contextvars and OTel spans stay
                # attached); wait_for is the Python 3.10 fallback.
                if _timeout_at is not None:
                    async with _timeout_at(deadline):
                        event = await anext(it)
                else:
                    event = await asyncio.wait_for(anext(it), max(deadline - loop.time(), 0.0))
            except StopAsyncIteration:
                return
            yield event
    finally:
        await it.aclose()  # type: ignore[attr-defined]


def _fill_final(usage: pb.Usage, timings: pb.Timings, event: TokenEvent) -> None:
    if event.usage:
        usage.input_tokens = event.usage.input_tokens
        usage.output_tokens = event.usage.output_tokens
        if event.usage.energy_joules is not None:
            usage.energy_joules = event.usage.energy_joules
            usage.energy_source = event.usage.energy_source
    if event.timings:
        timings.queue_s = event.timings.queue_s
        timings.time_to_first_token_s = event.timings.time_to_first_token_s
        timings.decode_s = event.timings.decode_s
        timings.total_s = event.timings.total_s
