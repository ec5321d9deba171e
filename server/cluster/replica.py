"""One cluster replica: a whole effllm server core (engines, variants, adapter registry, runners, telemetry)
inside a Ray Serve deployment, called by the front (front.py) through deployment handles.

The core is server/app.py's EffllmServer, assembled from the same flags as `effllm serve` by the same code
(cli.assemble: EngineArgs builds the engines, every ServerConfig field the plain server sets is set);
its gRPC port is never opened: the front calls the same servicer methods here with `ReplicaContext`, whose
`abort` raises `Refusal` (code and message, picklable) for the front to turn back into the same status.
Before the constructor returns (and Serve sends it traffic) the replica loads the adapters the cluster's
ledger recorded (LoadAdapter/PinAdapter sent to the front): a replica started later holds the same set.
Invariant: a request's stream is the servicer's generator; when the front cancels, Serve cancels this
generator and the runner's cleanup aborts the engine request and frees its slot, as in the single server.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import grpc

from ...api.status import STATUS
from ...api.v1 import adapters_pb2 as apb
from ...api.v1 import generation_pb2 as pb
from ...common.adapter_paths import parse_ref
from ...common.auth import AuthConfig
from ..engines.base import EffllmError

if TYPE_CHECKING:
    from ...telemetry.tracing import TelemetryConfig
    from ..app import EffllmServer

log = logging.getLogger("effllm.server")

# method -> (service, request class): the unary calls a replica answers for the front
UNARY: dict[str, tuple[str, Any]] = {
    "Generate": ("generation", pb.GenerateRequest),
    "GetModelInfo": ("generation", pb.GetModelInfoRequest),
    "GetStats": ("generation", pb.GetStatsRequest),
    "GetTelemetry": ("generation", pb.GetTelemetryRequest),
    "ListModels": ("generation", pb.ListModelsRequest),
    "LoadAdapter": ("adapters", apb.LoadAdapterRequest),
    "UnloadAdapter": ("adapters", apb.UnloadAdapterRequest),
    "ListAdapters": ("adapters", apb.ListAdaptersRequest),
    "PinAdapter": ("adapters", apb.PinAdapterRequest),
}
LEDGER = "effllm-ledger"  # the named actor holding the cluster's admin record
NAMESPACE = "effllm"


@dataclass(frozen=True)
class Route:
    """What the router (routing.py) reads of a call: the front's ranking of replicas, or one replica."""

    ranking: tuple[str, ...] = ()  # replica ids, best first (placement.Dispatcher.place)
    target: str = ""  # this replica only (admin broadcast, per-replica stats)


class Refusal(grpc.aio.AbortError):
    """A status the servicer set (code name, message): crosses the Ray hop, the front aborts with it."""

    def __init__(self, code: str, details: str) -> None:
        super().__init__(code, details)
        self.code = code
        self.details = details


class ReplicaContext:
    """The part of grpc.aio.ServicerContext the servicers use: abort and the caller's metadata."""

    def __init__(self, metadata: Sequence[tuple[str, str]]) -> None:
        self._metadata = tuple(metadata)

    def invocation_metadata(self) -> tuple[tuple[str, str], ...]:
        return self._metadata

    async def abort(self, code: grpc.StatusCode, details: str = "") -> None:
        raise Refusal(code.name, details)


class Replica:
    """The deployment class (launch.py wraps it with serve.deployment)."""

    # NOTE: Serve awaits an async constructor (Ray 2.60's replica wrapper): the model and the ledger's
    # adapters load before the replica is RUNNING, so no request reaches a replica still loading.
    async def __init__(  # type: ignore[misc]
        self, flags: dict[str, Any], telemetry: TelemetryConfig | None, auth: AuthConfig
    ) -> None:
        from ray import serve

        from .. import lifeline
        from ..app import EffllmServer, start_telemetry
        from ..cli import assemble, build_registry
        from ..engines import compile_cache
        from ..variants import VariantAdapters

        compile_cache.persist()  # before torch, as `effllm serve` does
        lifeline.install()  # engine children die with this replica
        self.replica_id = serve.get_replica_context().replica_id.unique_id
        args = argparse.Namespace(**flags)
        core = assemble(args, auth, None)
        engines = core.engines
        host = engines[0] if len(engines) == 1 else VariantAdapters(engines)
        if telemetry is not None and telemetry.enabled:
            base = telemetry.run_dir or Path(".")
            telemetry = replace(
                telemetry,
                run_dir=Path(base) / f"replica-{self.replica_id}",
                prometheus_port=None,
                trace_file=None,
                # every span and metric of this replica names it (OTel's service.instance.id)
                resource_attributes={**telemetry.resource_attributes, "service.instance.id": self.replica_id},
            )
        tele = start_telemetry(
            engines[0], telemetry, lambda: (self.server.models.queued, self.server.models.running)
        )
        self._loading: dict[str, asyncio.Lock] = {}
        self.adapter_loads = 0  # adapters this replica loaded on demand (the router sent it their requests)
        self.requests_warm = 0  # requests for an adapter this replica already held
        self.requests_cold = 0  # requests for an adapter that waited for its load here
        self.server: EffllmServer = EffllmServer(
            engines,
            core.config,
            build_registry(core.engine_args, args.adapter_unload_wait, host),
            tele,
            name=core.name,
            more=core.more,
        )
        await self.server.load()
        await self._replay()
        log.info("replica %s ready", self.replica_id)

    async def _replay(self) -> None:
        """Load what the cluster's ledger holds (published and pinned adapters) before taking traffic."""
        import ray

        try:
            ledger = ray.get_actor(LEDGER, namespace=NAMESPACE)
        except ValueError:
            return  # no ledger: a deployment without a front (tests of this class alone)
        for model, name, version, path, pinned in await ledger.entries.remote():
            try:
                registry = self.server.models.get(model).adapters
                entry = await registry.load(name, version, path)
                if pinned:
                    await registry.pin(entry.spec.name, entry.spec.version, True)
            except EffllmError as err:
                log.warning(
                    "replica %s: ledger adapter %s@%s not loaded: %s", self.replica_id, name, version, err
                )

    async def _hold(self, ref: str, model: str = "") -> None:
        """A request for an adapter in the adapter root that this replica does not hold: the router chose
        this replica for it (placement.py), so load it here first (for the request's model), once however
        many requests wait. Counts the request warm (held already) or cold (it waited for a load)."""
        if not ref:
            return
        try:
            registry = self.server.models.get(model).adapters
        except EffllmError:
            return  # a model not hosted: the servicer refuses it, naming the field
        if registry.peek(ref) is not None:
            self.requests_warm += 1
            return
        if registry.config.root is None:
            return
        try:
            name, version = parse_ref(ref)
        except (EffllmError, ValueError):
            return  # malformed: the servicer refuses it, naming the field
        async with self._loading.setdefault(f"{model}/{ref}", asyncio.Lock()):
            self.requests_cold += 1
            if registry.peek(ref) is not None:
                return
            try:
                await registry.load(name, "" if version == "latest" else version)
                self.adapter_loads += 1
            except EffllmError as err:
                raise Refusal(STATUS[err.code].name, err.message) from None

    async def call(
        self, method: str, request: bytes, metadata: Sequence[tuple[str, str]], route: Route | None = None
    ) -> tuple[str, bytes]:
        """One unary RPC of either service; returns (this replica's id, the reply's bytes)."""
        service, cls = UNARY[method]
        message = cls.FromString(request)
        if method == "Generate":
            await self._hold(message.adapter, message.model)
        servicer: Any = self.server.generation if service == "generation" else self.server.adapter_service
        reply = await getattr(servicer, method)(message, ReplicaContext(metadata))
        if method == "GetStats":  # what only a replica knows: its adapter affinity
            reply.adapter_requests_warm = self.requests_warm
            reply.adapter_requests_cold = self.requests_cold
            reply.adapter_loads_on_demand = self.adapter_loads
        return self.replica_id, reply.SerializeToString()

    async def stream(
        self, request: bytes, metadata: Sequence[tuple[str, str]], route: Route | None = None
    ) -> AsyncIterator[str | bytes]:
        """GenerateStream: this replica's id first, then each message's bytes."""
        yield self.replica_id
        message = pb.GenerateRequest.FromString(request)
        await self._hold(message.adapter, message.model)
        events = self.server.generation.GenerateStream(message, ReplicaContext(metadata))
        try:
            async for message in events:
                yield message.SerializeToString()
        finally:
            await events.aclose()  # type: ignore[attr-defined]

    def record_routing_stats(self) -> dict[str, Any]:
        """What the front chooses by besides its own in-flight counts (placement.state_of reads it), sent
        every half second; running and queued are for logs only (they lag)."""
        variants = [v for _, v in self.server.models.variants()]  # every hosted model's
        held: set[str] = set()
        for model in self.server.models:
            for entry in model.adapters.entries():
                held.add(entry.key)
                if model.adapters.is_latest(entry):
                    held.add(entry.spec.name)
        measured = [v.figures for v in variants if v.alive]  # a dead variant serves nothing
        return {
            "replica_id": self.replica_id,
            "adapter_loads": self.adapter_loads,
            "adapters": sorted(held),
            "running": self.server.models.running,
            "queued": self.server.models.queued,
            "slots": sum(v.runner.max_concurrency for v in variants),
            "ttft_s": min((f.ttft_s for f in measured), default=0.0),
            "tpot_s": min((f.tpot_s for f in measured), default=0.0),
            "j_per_token": min((f.j_per_token for f in measured), default=0.0),
        }

    def check_health(self) -> None:
        """Serve replaces a replica whose check raises: healthy while any variant is alive (a dead variant
        leaves routing, the others serve on, as in the single server)."""
        if not any(v.alive for _, v in self.server.models.variants()):
            raise RuntimeError(f"replica {self.replica_id}: every engine died")


class Ledger:
    """The cluster's admin record (a small named Ray actor, launch.py): published and pinned adapters, in
    load order, each for its model ("": the first), that a replica started later loads before it takes
    traffic."""

    def __init__(self) -> None:
        # (model, name) -> (model, name, version, path, pinned)
        self._entries: dict[tuple[str, str], tuple[str, str, str, str, bool]] = {}

    def loaded(self, name: str, version: str, path: str, model: str = "") -> None:
        pinned = self._entries.get((model, name), (model, name, "", "", False))[4]
        self._entries[model, name] = (model, name, version, path, pinned)

    def unloaded(self, name: str, version: str, model: str = "") -> None:
        kept = self._entries.get((model, name))
        if kept is not None and version in ("", kept[2]):
            del self._entries[model, name]

    def pinned(self, ref: str, pinned: bool, model: str = "") -> None:
        name, version = parse_ref(ref)
        kept = self._entries.get((model, name), (model, name, version, "", False))
        self._entries[model, name] = (model, kept[1], kept[2] or version, kept[3], pinned)

    def entries(self) -> list[tuple[str, str, str, str, bool]]:
        return list(self._entries.values())
