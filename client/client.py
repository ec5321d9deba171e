"""EffllmClient (blocking) and AsyncEffllmClient (asyncio): generate, stream, model info, stats, health,
and adapters (load, unload, list, pin).

Both build the same GenerateRequest (`build_request`) and take a per-call `timeout` (a gRPC deadline;
the server aborts the request when it passes). Errors surface as grpc.RpcError with the server's status.
`telemetry()` asks for the server's resource and per-request figures over a window (GetTelemetry).
`target` is one address or several replicas (a list or "h1:p1,h2:p2": round_robin, see channel.py);
`security` adds TLS / mutual TLS and a bearer token.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Iterator, Mapping, Sequence
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from opentelemetry.trace import TracerProvider

from ..api.objectives import objective_value
from ..api.v1 import adapters_pb2 as apb
from ..api.v1 import adapters_pb2_grpc as apb_grpc
from ..api.v1 import generation_pb2 as pb
from ..api.v1 import generation_pb2_grpc as pb_grpc
from .channel import ClientSecurity, Targets, make_aio_channel, make_channel
from .tracing import call_span, configured_tracer

Messages = Sequence[tuple[str, str] | dict[str, str]]
Budget = Mapping[str, float]  # GenerateRequest.budget fields by name
_GENERATE = "effllm.v1.GenerationService/Generate"
_STREAM = "effllm.v1.GenerationService/GenerateStream"


def build_request(
    prompt: str | None = None,
    *,
    messages: Messages | None = None,
    adapter: str = "",
    max_new_tokens: int | None = None,
    temperature: float | None = None,
    top_p: float | None = None,
    top_k: int | None = None,
    seed: int | None = None,
    stop: Sequence[str] = (),
    repetition_penalty: float | None = None,
    ignore_eos: bool = False,
    request_id: str = "",
    objective: str | int = "",
    budget: Budget | pb.Budget | None = None,
    strict_budget: bool = False,
    model: str | None = None,
) -> pb.GenerateRequest:
    """`prompt` (raw text) or `messages` ([(role, content)] or [{"role", "content"}]), not both.
    A sampling argument left None is left unset: the server uses the model's default for it (its
    generation_config.json, see ModelInfo.sampling_defaults); temperature=0 is greedy.
    `objective`: "latency", "energy", "quality", "balanced" (or an Objective number; "": the server's
    default); `budget`: {"max_time_to_first_token_s": .., "max_time_per_output_token_s": ..,
    "max_joules_per_token": .., "min_quality": ..} (any subset) or a pb.Budget; `strict_budget`: refuse
    (FAILED_PRECONDITION) rather than serve a budget no variant meets. `model`: the base model to run on
    (ListModels names them; None: the server's first)."""
    if (prompt is None) == (messages is None):
        raise ValueError("give exactly one of prompt or messages")
    sampling = pb.SamplingParams(max_new_tokens=max_new_tokens or 0, stop=list(stop), ignore_eos=ignore_eos)
    if top_k is not None:
        sampling.top_k = top_k
    if temperature is not None:
        sampling.temperature = temperature
    if top_p is not None:
        sampling.top_p = top_p
    if seed is not None:
        sampling.seed = seed
    if repetition_penalty is not None:
        sampling.repetition_penalty = repetition_penalty
    req = pb.GenerateRequest(
        adapter=adapter,
        request_id=request_id,
        sampling=sampling,
        objective=objective_value(objective),
        strict_budget=strict_budget,
        model=model,
    )
    if budget is not None:
        req.budget.CopyFrom(budget if isinstance(budget, pb.Budget) else pb.Budget(**budget))
    if prompt is not None:
        req.prompt = prompt
    else:
        turns = [m if isinstance(m, tuple) else (m["role"], m["content"]) for m in messages or ()]
        req.messages.messages.extend(pb.ChatMessage(role=r, content=c) for r, c in turns)
    return req


class EffllmClient:
    """`tracer_provider`: CLIENT spans for generate/stream, their W3C context sent to the server
    (default: the process's global provider, if one is installed; none otherwise)."""

    def __init__(
        self,
        target: Targets = "127.0.0.1:50051",
        *,
        timeout: float | None = 120.0,
        channel: grpc.Channel | None = None,
        security: ClientSecurity | None = None,
        tracer_provider: TracerProvider | None = None,
    ) -> None:
        if channel is None:
            self.channel, self._raw_channel = make_channel(target, security)
        else:
            self.channel = self._raw_channel = channel
        self.target = target if isinstance(target, str) else ",".join(target)
        self.timeout = timeout
        self._tracer = configured_tracer(tracer_provider)
        self._gen = pb_grpc.GenerationServiceStub(self.channel)
        self._health = health_pb2_grpc.HealthStub(self.channel)
        self._adapters = apb_grpc.AdapterServiceStub(self.channel)

    def generate(
        self, prompt: str | None = None, *, timeout: float | None = None, **kw: Any
    ) -> pb.GenerateResponse:
        with call_span(self._tracer, _GENERATE, self.target) as md:
            return self._gen.Generate(
                build_request(prompt, **kw), timeout=timeout or self.timeout, metadata=md
            )

    def stream(
        self, prompt: str | None = None, *, timeout: float | None = None, **kw: Any
    ) -> Iterator[pb.GenerateStreamResponse]:
        """Yields chunks as they are produced; the last has `final`. Closing the iterator cancels the call."""
        with call_span(self._tracer, _STREAM, self.target) as md:
            call = self._gen.GenerateStream(
                build_request(prompt, **kw), timeout=timeout or self.timeout, metadata=md
            )
            try:
                yield from call
            finally:
                call.cancel()

    def model_info(self, model: str | None = None) -> pb.ModelInfo:
        """`model`: one hosted model's (None: the first's)."""
        return self._gen.GetModelInfo(pb.GetModelInfoRequest(model=model), timeout=self.timeout)

    def list_models(self) -> list[pb.ModelInfo]:
        """Every base model the server hosts, the default first."""
        return list((self._gen.ListModels(pb.ListModelsRequest(), timeout=self.timeout)).models)

    def stats(self) -> pb.ServerStats:
        return self._gen.GetStats(pb.GetStatsRequest(), timeout=self.timeout)

    def telemetry(
        self, start_unix_s: float = 0.0, end_unix_s: float = 0.0, *, include_samples: bool = False
    ) -> pb.Telemetry:
        """The server's resource figures and per-request figures over [start, end] (0: open end)."""
        req = pb.GetTelemetryRequest(
            start_unix_s=start_unix_s, end_unix_s=end_unix_s, include_samples=include_samples
        )
        return self._gen.GetTelemetry(req, timeout=self.timeout)

    def load_adapter(
        self,
        name: str,
        version: str = "",
        *,
        path: str = "",
        timeout: float | None = None,
        model: str | None = None,
    ) -> apb.AdapterInfo:
        """Load ROOT/NAME/VERSION (empty: the highest on disk) or a folder `path` relative to the root, for
        `model` (None: the server's first)."""
        req = apb.LoadAdapterRequest(name=name, version=version, path=path, model=model)
        return self._adapters.LoadAdapter(req, timeout=timeout or self.timeout)

    def unload_adapter(
        self,
        name: str,
        version: str = "",
        *,
        wait_s: float = 0.0,
        timeout: float | None = None,
        model: str | None = None,
    ) -> list[str]:
        req = apb.UnloadAdapterRequest(name=name, version=version, wait_s=wait_s, model=model)
        return list(self._adapters.UnloadAdapter(req, timeout=timeout or self.timeout).unloaded)

    def list_adapters(self, model: str | None = None) -> list[apb.AdapterInfo]:
        req = apb.ListAdaptersRequest(model=model)
        return list(self._adapters.ListAdapters(req, timeout=self.timeout).adapters)

    def pin_adapter(
        self, name: str, version: str = "", *, pinned: bool = True, model: str | None = None
    ) -> apb.AdapterInfo:
        req = apb.PinAdapterRequest(name=name, version=version, pinned=pinned, model=model)
        return self._adapters.PinAdapter(req, timeout=self.timeout)

    def health(self, service: str = "") -> str:
        """SERVING, NOT_SERVING, ... as a name."""
        reply = self._health.Check(health_pb2.HealthCheckRequest(service=service), timeout=self.timeout)
        return health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)

    def wait_ready(self, timeout: float = 300.0) -> None:
        """Block until health says SERVING (the model is loaded). A watch the server drops while it starts
        (CANCELLED, UNAVAILABLE: e.g. when the engine starts its worker processes) is opened again."""
        deadline = time.monotonic() + timeout
        grpc.channel_ready_future(self._raw_channel).result(timeout=timeout)
        while True:
            left = deadline - time.monotonic()
            call = self._health.Watch(health_pb2.HealthCheckRequest(service=""), timeout=max(left, 0.01))
            try:
                for reply in call:
                    if reply.status == health_pb2.HealthCheckResponse.SERVING:
                        return
            except grpc.RpcError as err:
                retry = (grpc.StatusCode.CANCELLED, grpc.StatusCode.UNAVAILABLE)
                if err.code() not in retry or time.monotonic() + 0.5 >= deadline:
                    raise
            finally:
                call.cancel()
            time.sleep(0.5)

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> EffllmClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class AsyncEffllmClient:
    def __init__(
        self,
        target: Targets = "127.0.0.1:50051",
        *,
        timeout: float | None = 120.0,
        channel: grpc.aio.Channel | None = None,
        security: ClientSecurity | None = None,
        tracer_provider: TracerProvider | None = None,
    ) -> None:
        self.channel = channel or make_aio_channel(target, security)
        self.target = target if isinstance(target, str) else ",".join(target)
        self.timeout = timeout
        self._tracer = configured_tracer(tracer_provider)
        self._gen = pb_grpc.GenerationServiceStub(self.channel)
        self._health = health_pb2_grpc.HealthStub(self.channel)
        self._adapters = apb_grpc.AdapterServiceStub(self.channel)

    async def generate(
        self, prompt: str | None = None, *, timeout: float | None = None, **kw: Any
    ) -> pb.GenerateResponse:
        with call_span(self._tracer, _GENERATE, self.target) as md:
            return await self._gen.Generate(
                build_request(prompt, **kw), timeout=timeout or self.timeout, metadata=md
            )

    async def stream(
        self, prompt: str | None = None, *, timeout: float | None = None, **kw: Any
    ) -> AsyncIterator[pb.GenerateStreamResponse]:
        with call_span(self._tracer, _STREAM, self.target) as md:
            call = self._gen.GenerateStream(
                build_request(prompt, **kw), timeout=timeout or self.timeout, metadata=md
            )
            try:
                async for chunk in call:
                    yield chunk
            finally:
                call.cancel()

    async def model_info(self, model: str | None = None) -> pb.ModelInfo:
        """`model`: one hosted model's (None: the first's)."""
        return await self._gen.GetModelInfo(pb.GetModelInfoRequest(model=model), timeout=self.timeout)

    async def list_models(self) -> list[pb.ModelInfo]:
        """Every base model the server hosts, the default first."""
        return list((await self._gen.ListModels(pb.ListModelsRequest(), timeout=self.timeout)).models)

    async def stats(self) -> pb.ServerStats:
        return await self._gen.GetStats(pb.GetStatsRequest(), timeout=self.timeout)

    async def telemetry(
        self, start_unix_s: float = 0.0, end_unix_s: float = 0.0, *, include_samples: bool = False
    ) -> pb.Telemetry:
        req = pb.GetTelemetryRequest(
            start_unix_s=start_unix_s, end_unix_s=end_unix_s, include_samples=include_samples
        )
        return await self._gen.GetTelemetry(req, timeout=self.timeout)

    async def load_adapter(
        self,
        name: str,
        version: str = "",
        *,
        path: str = "",
        timeout: float | None = None,
        model: str | None = None,
    ) -> apb.AdapterInfo:
        req = apb.LoadAdapterRequest(name=name, version=version, path=path, model=model)
        return await self._adapters.LoadAdapter(req, timeout=timeout or self.timeout)

    async def unload_adapter(
        self,
        name: str,
        version: str = "",
        *,
        wait_s: float = 0.0,
        timeout: float | None = None,
        model: str | None = None,
    ) -> list[str]:
        req = apb.UnloadAdapterRequest(name=name, version=version, wait_s=wait_s, model=model)
        return list((await self._adapters.UnloadAdapter(req, timeout=timeout or self.timeout)).unloaded)

    async def list_adapters(self, model: str | None = None) -> list[apb.AdapterInfo]:
        reply = await self._adapters.ListAdapters(apb.ListAdaptersRequest(model=model), timeout=self.timeout)
        return list(reply.adapters)

    async def pin_adapter(
        self, name: str, version: str = "", *, pinned: bool = True, model: str | None = None
    ) -> apb.AdapterInfo:
        req = apb.PinAdapterRequest(name=name, version=version, pinned=pinned, model=model)
        return await self._adapters.PinAdapter(req, timeout=self.timeout)

    async def health(self, service: str = "") -> str:
        reply = await self._health.Check(health_pb2.HealthCheckRequest(service=service), timeout=self.timeout)
        return health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)

    async def close(self) -> None:
        await self.channel.close()

    async def __aenter__(self) -> AsyncEffllmClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
