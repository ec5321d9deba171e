"""Assemble and run the gRPC server: services, health, reflection, engine start-up and drain.

Order matters: the port opens first with health NOT_SERVING (so orchestrators can watch the load), the
engine starts, health turns SERVING. On SIGTERM/SIGINT health turns NOT_SERVING, new requests get
UNAVAILABLE, in-flight ones finish within the grace period, then the process exits 0; a second signal
stops at once. A variant whose engine dies leaves routing and its requests end UNAVAILABLE while the
others serve on (health stays SERVING); once every variant is dead the server stops with ENGINE_DIED_EXIT.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer
from grpc_reflection.v1alpha import reflection

from ..api.v1 import adapters_pb2_grpc as apb_grpc
from ..api.v1 import generation_pb2 as pb
from ..api.v1 import generation_pb2_grpc as pb_grpc
from ..common.adapter_paths import parse_ref
from ..common.auth import AuthConfig, AuthInterceptor, TlsConfig
from ..telemetry.energy import resolve_watts_per_core
from .adapters.registry import AdapterRegistry
from .adapters.service import SERVICE_NAME as ADAPTER_SERVICE_NAME
from .adapters.service import AdapterService
from .defaults import SamplingDefaults
from .engines.base import EffllmError, Engine
from .models import HostedModel, HostSettings, ModelHost, Models
from .router import OBJECTIVES
from .service import GenerationService, Limits
from .variants import EXPLORE_SHARE, Variant

if TYPE_CHECKING:
    from ..telemetry.serving import ServerTelemetry
    from ..telemetry.tracing import TelemetryConfig

log = logging.getLogger("effllm.server")

ENGINE_DIED_EXIT = 3
SERVICE_NAMES = (pb.DESCRIPTOR.services_by_name["GenerationService"].full_name, ADAPTER_SERVICE_NAME)


MAX_STREAM_INTERVAL = 64  # tokens per GenerateStream message, at most


@dataclass(frozen=True)
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 50051
    max_concurrency: int = 32
    queue_size: int = 256
    max_message_bytes: int = 16 << 20
    grace_s: float = 30.0
    limits: Limits = field(default_factory=Limits)
    auth: AuthConfig = field(default_factory=AuthConfig)
    tls: TlsConfig | None = None
    # NAME or NAME@VERSION (MODEL:NAME[@VERSION] for another hosted model), loaded before health turns SERVING
    preload: tuple[str, ...] = ()
    # What unset sampling fields become (the model's generation_config.json); shown by GetModelInfo.
    sampling_defaults: SamplingDefaults = field(default_factory=SamplingDefaults)
    chat_template: bool = False  # the model has one (GetModelInfo tells clients chat turns are welcome)
    # What a request that names no objective gets (router.py). latency: a client that says nothing wants
    # what a server without variants gives it, the fastest answer, and ranking by predicted latency also
    # spreads load over the variants.
    default_objective: str = "latency"
    # The CPU energy estimate's watts per core (serve --watts-per-core); None: EFFLLM_WATTS_PER_CORE or
    # the default. Resolved once, in EffllmServer, for the start-up J/token figures.
    watts_per_core: float | None = None
    # At most this share of routed requests goes to a stale variant to refresh its figures (0: never).
    explore_share: float = EXPLORE_SHARE
    # GenerateStream: up to this many tokens per message (the first token always alone, at once; the final
    # message flushes): fewer, larger messages cost less per token on every hop (vLLM's --stream-interval).
    stream_interval: int = 1

    def __post_init__(self) -> None:
        if not 0 <= self.port < 65536:
            raise ValueError(f"port {self.port} is not in 0..65535")
        if self.max_concurrency < 1 or self.queue_size < 0:
            raise ValueError("max_concurrency >= 1 and queue_size >= 0 are required")
        if self.max_message_bytes < 1024 or self.grace_s < 0:
            raise ValueError("max_message_bytes >= 1024 and grace_s >= 0 are required")
        if self.default_objective not in OBJECTIVES:
            raise ValueError(f"default_objective {self.default_objective!r} is not one of {OBJECTIVES}")
        if not 0.0 <= self.explore_share <= 1.0:
            raise ValueError(f"explore_share {self.explore_share} is not in 0..1")
        if not 1 <= self.stream_interval <= MAX_STREAM_INTERVAL:
            raise ValueError(f"stream_interval {self.stream_interval} is not in 1..{MAX_STREAM_INTERVAL}")


class EffllmServer:
    """One gRPC server around one engine, or several (variants of one model, the first the default), or
    several base models (`more`: each its own variants, adapters and admission, server/models.py); a
    request naming no model runs on the first. `start()` returns once the port is bound."""

    def __init__(
        self,
        engine: Engine | Sequence[Engine],
        config: ServerConfig,
        adapters: AdapterRegistry | None = None,
        telemetry: ServerTelemetry | None = None,
        *,
        name: str = "",
        more: Sequence[HostedModel] = (),
    ) -> None:
        engines: list[Engine] = list(engine) if isinstance(engine, Sequence) else [engine]
        if not engines:
            raise ValueError("a server needs at least one engine")
        self.config = config
        self.telemetry = telemetry
        self.watts_per_core = resolve_watts_per_core(config.watts_per_core)  # flag > env > default
        settings = HostSettings(
            config.max_concurrency,
            config.queue_size,
            config.default_objective,
            config.explore_share,
            self.watts_per_core,
            config.sampling_defaults,
            config.chat_template,
            several=bool(more),
        )
        observer = telemetry.observer if telemetry else None
        first = HostedModel(tuple(engines), name, adapters)
        self.models = Models([ModelHost(spec, settings, observer) for spec in (first, *more)])
        # the first model's, as a server with one model has them
        default = self.models.default
        self.engine = engines[0]
        self.engines = [e for h in self.models for e in h.engines]  # every model's, in start-up order
        self.adapters = default.adapters
        self.variants = default.variants
        self.runner = self.variants.default.runner
        if telemetry is not None:
            telemetry.watch_variants(self.models.states)
        self.generation = GenerationService(
            self.variants,
            config.limits,
            config.sampling_defaults,
            config.chat_template,
            telemetry,
            config.auth,
            # a margin under the message cap for the frame and the metadata
            max_reply_bytes=config.max_message_bytes - 512,
            models=self.models,
            stream_interval=config.stream_interval,
        )
        self.adapter_service = AdapterService(self.adapters, self.variants.holders, models=self.models)
        self.health = HealthServicer()
        self.port = 0
        self._server: grpc.aio.Server | None = None
        self._stopped = asyncio.Event()
        self._watchdog: asyncio.Task[None] | None = None
        self.failure: str | None = None  # why the server stopped on its own (then exit ENGINE_DIED_EXIT)
        self.watch_interval_s = 0.5  # how often the watchdog asks engine.alive()

    async def start(self) -> int:
        opts = [
            ("grpc.max_receive_message_length", self.config.max_message_bytes),
            ("grpc.max_send_message_length", self.config.max_message_bytes),
        ]
        # Auth first: a refused call is never traced as served work, and costs nothing more.
        interceptors = [AuthInterceptor(self.config.auth)] if self.config.auth.enabled else []
        interceptors += self.telemetry.interceptors() if self.telemetry else []
        server = grpc.aio.server(options=opts, interceptors=interceptors)
        pb_grpc.add_GenerationServiceServicer_to_server(self.generation, server)
        apb_grpc.add_AdapterServiceServicer_to_server(self.adapter_service, server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        names = (
            *SERVICE_NAMES,
            health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
            reflection.SERVICE_NAME,
        )
        reflection.enable_server_reflection(names, server)
        address = f"{self.config.host}:{self.config.port}"
        tls = self.config.tls
        self.port = (
            server.add_secure_port(address, tls.credentials()) if tls else server.add_insecure_port(address)
        )
        if self.port == 0:
            raise RuntimeError(f"could not bind {self.config.host}:{self.config.port}")
        await self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)
        await server.start()
        self._server = server
        log.info(
            "listening on %s:%d (%s%s; health NOT_SERVING while the model loads)",
            self.config.host,
            self.port,
            ("mutual TLS" if tls.client_ca else "TLS") if tls else "plaintext",
            ", bearer-token auth" if self.config.auth.enabled else "",
        )
        return self.port

    async def load(self) -> None:
        for engine in self.engines:  # one at a time: each loads its weights (memory peaks stay apart)
            await engine.start()
        for host in self.models:
            await host.variants.measure(self.config.limits.default_max_new_tokens, self.watts_per_core)
        for ref in self.config.preload:
            model, _, adapter = ref.rpartition(":")  # MODEL:NAME[@VERSION] on a server hosting several
            try:
                await self.models.get(model).adapters.load(*parse_ref(adapter))
            except EffllmError as err:
                raise RuntimeError(f"--preload {ref}: {err.message}") from err
        self.adapter_service.ready = True
        if self.generation.draining:  # a signal came while loading: never turn SERVING
            return
        self.generation.ready = True
        await self._set_health(health_pb2.HealthCheckResponse.SERVING)
        self._watchdog = asyncio.get_running_loop().create_task(self._watch_engine())
        # "MODEL (ENGINE, PRECISION, DEVICE)" with one "(...)" per variant, "; " between them and ", "
        # between models: one model with one variant reads as before
        hosted = ", ".join(
            f"{h.engines[0].info.model if len(self.models) == 1 else h.name} "
            + "; ".join(
                f"({v.engine.info.engine}, {v.engine.info.precision}, {v.engine.info.device})"
                for v in h.variants.variants
            )
            for h in self.models
        )
        log.info("ready: %s on %s:%d", hosted, self.config.host, self.port)

    async def _watch_engine(self) -> None:
        """An engine that died (vLLM's engine core can) serves nothing again. Its variant is marked dead
        (routing already skips it: `Variant.alive`) while the others serve on; once every variant is dead,
        stop being SERVING at once so balancers and round_robin clients go elsewhere, then exit non-zero
        for the supervisor to restart."""
        while self._server is not None:
            await asyncio.sleep(self.watch_interval_s)
            # A draining server shuts its engines down on purpose: that is not a death.
            if self._server is None or self.generation.draining:
                continue
            for host, v in self.models.variants():
                if not v.dead and not v.engine.alive():
                    host.variants.mark_dead(v)
                    self._variant_died(host, v)
            if all(v.dead for _, v in self.models.variants()):
                self.failure = "the engine died"
                log.error("engine died: health NOT_SERVING, stopping (exit code %d)", ENGINE_DIED_EXIT)
                await self.drain(grace_s=0.0)
                return

    def _variant_died(self, host: ModelHost, dead: Variant) -> None:
        several = len(self.models) > 1  # name variants MODEL/VARIANT, as the gauge does
        live = [f"{h.name}/{v.name}" if several else v.name for h, v in self.models.variants() if not v.dead]
        if not live:
            return  # the last one (or the only one): the server stops, as the caller logs
        log.error(
            "variant %s died: its engine serves nothing more, its %d running and %d queued requests end "
            "UNAVAILABLE; %s keep%s serving (health stays SERVING)",
            f"{host.name}/{dead.name}" if several else dead.name,
            dead.runner.running,
            dead.runner.queued,
            ", ".join(live),
            "s" if len(live) == 1 else "",
        )

    async def shutdown_engines(self) -> None:
        for engine in self.engines:
            await engine.shutdown()

    async def _set_health(self, status: int) -> None:
        for name in ("", *SERVICE_NAMES):
            await self.health.set(name, status)

    async def drain(self, grace_s: float | None = None) -> None:
        """Refuse new work, let in-flight requests finish (bounded), then stop. Runs once."""
        if self._server is None or self.generation.draining:
            return
        grace = self.config.grace_s if grace_s is None else grace_s
        self.generation.draining = True
        await self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)
        log.info(
            "draining: %d running, %d queued, grace %.1fs", self.models.running, self.models.queued, grace
        )
        loop = asyncio.get_running_loop()
        started = loop.time()
        deadline = started + grace
        while self.models.running + self.models.queued > 0 and loop.time() < deadline:
            await asyncio.sleep(0.05)
        left = self.models.running + self.models.queued
        if left:
            log.warning("grace period over: cancelling %d requests", left)
        await self._server.stop(grace=0.5)
        await self.shutdown_engines()
        if self.telemetry is not None:
            self.telemetry.shutdown()  # flush spans and metrics before the process exits
        self._server = None
        log.info("drained in %.2fs", loop.time() - started)
        self._stopped.set()

    async def wait(self) -> None:
        await self._stopped.wait()


def _kill_children() -> None:
    """The engine's worker processes (vLLM's engine core) must not outlive an immediate exit."""
    import psutil

    for child in psutil.Process().children(recursive=True):
        with contextlib.suppress(psutil.Error):
            child.kill()


async def serve(
    engine: Engine | Sequence[Engine],
    config: ServerConfig,
    adapters: AdapterRegistry | None = None,
    telemetry_config: TelemetryConfig | None = None,
    *,
    name: str = "",
    more: Sequence[HostedModel] = (),
) -> int:
    """Build the server around `engine` (or its variants: several engines; `more`: further base models)
    and `run` it; returns the process's exit code."""
    # The gauges read the runners lazily, so they may be registered before the server exists.
    first = engine[0] if isinstance(engine, Sequence) else engine
    telemetry = start_telemetry(
        first, telemetry_config, lambda: (server.models.queued, server.models.running)
    )
    server = EffllmServer(engine, config, adapters, telemetry, name=name, more=more)
    return await run(server)


async def run(server: EffllmServer) -> int:
    """Start, load and serve until SIGTERM/SIGINT; the first signal drains, a second one exits at once.
    Returns the exit code: 0 after a drain, ENGINE_DIED_EXIT when the engine died under it. The signal
    handlers are this call's only: they are removed when it returns."""
    loop = asyncio.get_running_loop()
    signals = 0
    tasks: set[asyncio.Task[None]] = set()  # keep a reference: the loop holds tasks weakly

    def on_signal() -> None:
        nonlocal signals
        signals += 1
        if signals == 1:
            log.info("signal received: draining (send again to stop now)")
            tasks.add(loop.create_task(server.drain()))
        else:
            log.warning("second signal: stopping now")
            _kill_children()
            for host in server.models:  # os._exit skips atexit, where the snapshot folders go otherwise
                host.adapters.close()
            os._exit(1)

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal)
    try:
        await server.start()
        await server.load()
        await server.wait()
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)
    if not server.generation.ready:  # drained while loading: the engine came up after drain's shutdown
        await server.shutdown_engines()
    log.info("stopped")
    return ENGINE_DIED_EXIT if server.failure else 0


def start_telemetry(
    engine: Engine, config: TelemetryConfig | None, load: Callable[[], tuple[int, int]]
) -> ServerTelemetry | None:
    """Traces, metrics, sampler and energy for this server; None when telemetry is off."""
    if config is None or not config.enabled:
        log.info("telemetry off")
        return None
    from ..telemetry.genai import ServedModel
    from ..telemetry.serving import ServerTelemetry

    info = engine.info
    served = ServedModel(info.model, info.precision, info.engine, info.parameters)
    return ServerTelemetry.start(config, served, load)
