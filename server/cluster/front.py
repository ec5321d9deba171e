"""The cluster's front: our own grpc.aio server (the same effllm.v1 services, auth/TLS/roles, bind host,
health, reflection) that forwards each call to a replica through a Ray Serve deployment handle.

Why not Serve's own gRPC proxy: it has no TLS and no bind-host option (all interfaces), no standard health
service, returns a raised error as INTERNAL with a Ray traceback, and a client's explicit cancel of a stream
did not reach the replica (issue 25's trial). Here every failure maps onto our status table: a replica's
refusal comes back with its own code and message (replica.Refusal); a replica that died before the request
produced anything is retried on another one; one that died mid-stream gives UNAVAILABLE; anything else is
INTERNAL naming the error type only, never a traceback.
Each request's replica is chosen here (placement.Dispatcher: this front's own count of its requests in
flight on each replica, +1 at dispatch and -1 when the call ends however it ends, and each replica's
adapters and figures from its routing stats); the router (routing.py) passes the ranking on to Serve.
Admin calls (LoadAdapter, UnloadAdapter, PinAdapter) go to every replica and into the ledger (a replica
started later loads its set first); ListAdapters, GetStats, GetModelInfo and GetTelemetry merge every
replica's answer,
each replica's in `replicas`. The replica that served a request is named in its final message (`replica`)
and in the `effllm-replica` trailing metadata.
Invariant: a call the client cancels (or whose deadline passes) cancels its handle call, and so the
replica's generator: the runner aborts the engine request and frees its slot; and it leaves the front's
in-flight count of that replica.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from contextlib import aclosing
from typing import Any, NoReturn, TypeVar

import grpc
from google.protobuf.message import Message

from ...api.objectives import objective_name
from ...api.v1 import adapters_pb2 as apb
from ...api.v1 import adapters_pb2_grpc as apb_grpc
from ...api.v1 import generation_pb2 as pb
from ...api.v1 import generation_pb2_grpc as pb_grpc
from .placement import Dispatcher, Want
from .replica import Refusal, Route
from .routing import VIEW

log = logging.getLogger("effllm.server")
RETRIES = 2  # other replicas a request that produced nothing is sent to after its replica died
REPLICA_KEY = "effllm-replica"
M = TypeVar("M", bound=Message)


class ReplicaDied(Exception):
    def __init__(self, replica: str, why: str) -> None:
        super().__init__(replica, why)
        self.replica, self.why = replica, why


def _died(err: BaseException) -> bool:
    """The replica (or its actor) is gone or unreachable: the request may go to another one."""
    from ray import exceptions as rex
    from ray.serve import exceptions as sex

    return isinstance(
        err,
        (rex.ActorDiedError, rex.ActorUnavailableError, rex.RayActorError, sex.DeploymentUnavailableError),
    )


async def _fail(context: grpc.aio.ServicerContext, err: BaseException, what: str) -> NoReturn:
    """Our status table for whatever came back from a replica; never a traceback on the wire."""
    cause = getattr(err, "cause", None)
    refusal = err if isinstance(err, Refusal) else cause if isinstance(cause, Refusal) else None
    if refusal is not None:
        await context.abort(grpc.StatusCode[refusal.code], refusal.details)
    if isinstance(err, ReplicaDied):
        await context.abort(grpc.StatusCode.UNAVAILABLE, f"replica {err.replica} {err.why}")
    from ray.serve import exceptions as sex

    if isinstance(err, sex.BackPressureError):
        await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, "every replica is at its queue limit")
    if _died(err):
        await context.abort(
            grpc.StatusCode.UNAVAILABLE, f"{what}: no replica could take it ({type(err).__name__})"
        )
    log.error("%s failed in the cluster: %s", what, err)
    await context.abort(grpc.StatusCode.INTERNAL, f"{what} failed in the cluster: {type(err).__name__}")
    raise AssertionError("unreachable")


class Cluster:
    """The front's side of the deployment handle: one call, one replica (routed), or every replica."""

    def __init__(self, handle: Any, call_timeout_s: float = 120.0) -> None:
        self.handle = handle
        self.call_timeout_s = call_timeout_s  # per replica, for the calls sent to each (admin, stats)
        self.draining = False
        self.ready = False
        self.in_flight = 0  # calls in the front (drain waits for them)
        self.dispatcher = Dispatcher()  # requests in flight per replica, adapter assignments

    def place(self, want: Want) -> Route:
        """The front's ranking for one request, from its own counts and the replicas' stats."""
        stats = VIEW.stats()
        if not stats:
            return Route()  # no replica known yet: Serve waits for one
        return Route(ranking=self.dispatcher.place(stats, want).ranking)

    async def generate(
        self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> tuple[str, bytes]:
        """One Generate, placed by the front and counted on its replica until it ends; retried on another
        replica when its replica died (a unary call has produced nothing for the client until it
        returns)."""
        want = _want(request)
        for attempt in range(RETRIES + 1):
            route = self.place(want)
            with self.dispatcher.sending(route.ranking[0] if route.ranking else "") as sent:
                try:
                    replica, data = await self.call("Generate", request, context, route)
                    sent.on(replica)
                    return replica, data
                except Exception as err:
                    if not _died(err) or attempt == RETRIES:
                        raise
                    want = Want(want.adapter, want.objective, want.avoid | {sent.replica_id})
                    log.warning("Generate: replica died before answering, retrying elsewhere (%s)", err)
        raise AssertionError("unreachable")

    async def call(
        self, method: str, request: Message, context: grpc.aio.ServicerContext, route: Route
    ) -> tuple[str, bytes]:
        """One unary call on the replica `route` names (or ranks first)."""
        metadata = tuple(context.invocation_metadata() or ())
        response = self.handle.options(method_name="call").remote(
            method, request.SerializeToString(), metadata, route=route
        )
        try:
            return await response  # type: ignore[no-any-return]
        except asyncio.CancelledError:
            response.cancel()  # the client went away: the replica's call is cancelled too
            raise

    async def each(
        self, method: str, request: Message, context: grpc.aio.ServicerContext
    ) -> dict[str, bytes | BaseException]:
        """`method` on every replica the router knows of: replica id -> reply bytes or the error."""
        ids = VIEW.ids()

        async def one(rid: str) -> bytes | BaseException:
            try:
                _, data = await asyncio.wait_for(
                    self.call(method, request, context, Route(target=rid)), self.call_timeout_s
                )
                return data
            except Exception as err:
                return err

        results = await asyncio.gather(*(one(rid) for rid in ids))
        return dict(zip(ids, results, strict=True))


def _want(request: pb.GenerateRequest) -> Want:
    name = objective_name(request.objective) or ""  # a bad number is refused by the replica, naming it
    return Want(adapter=request.adapter, objective=name)


class FrontGeneration(pb_grpc.GenerationServiceServicer):
    def __init__(self, cluster: Cluster) -> None:
        self.cluster = cluster

    async def _admit(self, context: grpc.aio.ServicerContext) -> None:
        if self.cluster.draining or not self.cluster.ready:
            await context.abort(
                grpc.StatusCode.UNAVAILABLE,
                "server is draining" if self.cluster.draining else "model is loading",
            )

    async def Generate(
        self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> pb.GenerateResponse:
        await self._admit(context)
        self.cluster.in_flight += 1
        try:
            replica, data = await self.cluster.generate(request, context)
        except Exception as err:
            await _fail(context, err, "Generate")
        finally:
            self.cluster.in_flight -= 1
        context.set_trailing_metadata(((REPLICA_KEY, replica),))
        reply = pb.GenerateResponse.FromString(data)
        reply.replica = replica
        return reply

    async def GenerateStream(
        self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.GenerateStreamResponse]:
        await self._admit(context)
        self.cluster.in_flight += 1
        try:
            # aclosing: a cancel while this frame waits at its yield still closes _stream at once, so its
            # replica call is cancelled and its in-flight count taken off now, not at garbage collection
            async with aclosing(self._stream(request, context)) as events:
                async for replica, message in events:
                    if message.HasField("final"):
                        context.set_trailing_metadata(((REPLICA_KEY, replica),))
                        message.final.replica = replica
                    yield message
        except Exception as err:
            await _fail(context, err, "GenerateStream")
        finally:
            self.cluster.in_flight -= 1

    async def _stream(
        self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> AsyncGenerator[tuple[str, pb.GenerateStreamResponse], None]:
        metadata = tuple(context.invocation_metadata() or ())
        want = _want(request)
        data = request.SerializeToString()
        dispatcher = self.cluster.dispatcher
        for attempt in range(RETRIES + 1):
            route = self.cluster.place(want)
            with dispatcher.sending(route.ranking[0] if route.ranking else "") as sent:
                gen = self.cluster.handle.options(method_name="stream", stream=True).remote(
                    data, metadata, route=route
                )
                replica, produced, done = "", False, False
                try:
                    async for item in gen:
                        if isinstance(item, str):
                            replica = item
                            sent.on(replica)  # counted where it runs
                            continue
                        produced = True
                        yield replica, pb.GenerateStreamResponse.FromString(item)
                    done = True
                    return
                except Exception as err:
                    if not _died(err):
                        raise
                    if produced:
                        raise ReplicaDied(
                            replica or "?", "died mid-stream; the tokens so far are all there is"
                        ) from err
                    if attempt == RETRIES:
                        raise
                    log.warning(
                        "GenerateStream: replica %s died before the first token, retrying", replica or "?"
                    )
                    want = Want(want.adapter, want.objective, want.avoid | {sent.replica_id})
                finally:
                    if not done:
                        gen.cancel()  # the client cancelled, or we gave up: the replica's generator closes

    async def GetModelInfo(
        self, request: pb.GetModelInfoRequest, context: grpc.aio.ServicerContext
    ) -> pb.ModelInfo:
        await self._admit(context)
        replies = await _every(self.cluster, "GetModelInfo", request, context, pb.ModelInfo)
        out = pb.ModelInfo()
        out.CopyFrom(next(iter(replies.values())))
        for rid, info in replies.items():
            out.replicas[rid].CopyFrom(info)
        return out

    async def ListModels(
        self, request: pb.ListModelsRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListModelsResponse:
        """Every model, as the replicas host them (the same flags: one replica's list, each model with every
        replica's own answer in `replicas`)."""
        await self._admit(context)
        replies = await _every(self.cluster, "ListModels", request, context, pb.ListModelsResponse)
        out = pb.ListModelsResponse()
        out.CopyFrom(replies[sorted(replies)[0]])
        for rid in sorted(replies):
            for model, theirs in zip(out.models, replies[rid].models, strict=False):
                model.replicas[rid].CopyFrom(theirs)
        return out

    async def GetStats(
        self, request: pb.GetStatsRequest, context: grpc.aio.ServicerContext
    ) -> pb.ServerStats:
        replies = await _every(self.cluster, "GetStats", request, context, pb.ServerStats)
        out = pb.ServerStats()
        for rid, stats in replies.items():
            for name in ("running", "queued", "engine_running", "requests_total", "requests_cancelled",
                         "requests_rejected", "output_tokens_total", "adapter_requests_warm",
                         "adapter_requests_cold", "adapter_loads_on_demand"):  # fmt: skip
                setattr(out, name, getattr(out, name) + getattr(stats, name))
            out.replicas[rid].CopyFrom(stats)
        return out

    async def GetTelemetry(
        self, request: pb.GetTelemetryRequest, context: grpc.aio.ServicerContext
    ) -> pb.Telemetry:
        replies = await _every(self.cluster, "GetTelemetry", request, context, pb.Telemetry)
        return merge_telemetry(replies)


def merge_telemetry(replies: dict[str, pb.Telemetry]) -> pb.Telemetry:
    """Every replica's Telemetry in one (the proto's Telemetry.replicas comment says how), each in
    `replicas`. Replicas serve one model with the same flags: model, precision and engine are the first's."""
    first = replies[sorted(replies)[0]]
    out = pb.Telemetry(model=first.model, precision=first.precision, engine=first.engine)
    on = [t for t in replies.values() if t.enabled]
    out.enabled = bool(on)
    if on:
        out.start_unix_s = min(t.start_unix_s for t in on)
        out.end_unix_s = max(t.end_unix_s for t in on)
    groups: dict[tuple[str, str], pb.GroupFigures] = {}
    with_resources = [t.resources for t in on if t.HasField("resources")]
    for rid in sorted(replies):
        t = replies[rid]
        out.replicas[rid].CopyFrom(t)
        out.requests.extend(t.requests)
        out.samples.extend(t.samples)
        for g in t.groups:
            key = (g.adapter, g.precision)
            m = groups.setdefault(key, pb.GroupFigures(adapter=g.adapter, precision=g.precision))
            m.requests += g.requests
            m.errors += g.errors
            m.output_tokens += g.output_tokens
            if g.HasField("energy_j"):
                m.energy_j = m.energy_j + g.energy_j
                m.energy_source = g.energy_source
    for m in groups.values():
        if m.HasField("energy_j") and m.output_tokens:
            m.j_per_token = m.energy_j / m.output_tokens
    out.groups.extend(groups[k] for k in sorted(groups))
    if with_resources:
        r = out.resources
        r.samples = sum(x.samples for x in with_resources)
        r.window_s = max(x.window_s for x in with_resources)
        r.amu = sum(x.amu for x in with_resources) / len(with_resources)
        r.amu_bytes = sum(x.amu_bytes for x in with_resources)
        r.peak_memory_bytes = sum(x.peak_memory_bytes for x in with_resources)
        r.pcu = sum(x.pcu for x in with_resources) / len(with_resources)
        r.aec_w = sum(x.aec_w for x in with_resources)
        r.energy_j = sum(x.energy_j for x in with_resources)
        r.energy_source = with_resources[0].energy_source
        r.device = with_resources[0].device
    return out


async def _every(
    cluster: Cluster, method: str, request: Message, context: grpc.aio.ServicerContext, cls: Callable[..., M]
) -> dict[str, M]:
    """Every replica's reply; a refusal from any is the call's; none answering is UNAVAILABLE."""
    results = await cluster.each(method, request, context)
    replies: dict[str, M] = {}
    for rid, got in results.items():
        if isinstance(got, BaseException):
            cause = getattr(got, "cause", None)
            if isinstance(got, Refusal) or isinstance(cause, Refusal):
                await _fail(context, got, method)
            log.warning("%s: replica %s did not answer (%s)", method, rid, type(got).__name__)
            continue
        replies[rid] = cls.FromString(got)  # type: ignore[attr-defined]
    if not replies:
        await context.abort(grpc.StatusCode.UNAVAILABLE, f"{method}: no replica answered")
    return replies


class FrontAdapters(apb_grpc.AdapterServiceServicer):
    def __init__(self, cluster: Cluster, ledger: Any) -> None:
        self.cluster = cluster
        self.ledger = ledger  # the named Ray actor (replica.Ledger)

    async def LoadAdapter(
        self, request: apb.LoadAdapterRequest, context: grpc.aio.ServicerContext
    ) -> apb.AdapterInfo:
        replies = await _every(self.cluster, "LoadAdapter", request, context, apb.AdapterInfo)
        first = next(iter(replies.values()))
        await self.ledger.loaded.remote(request.name, first.version, request.path, request.model)
        return _merged(first, replies)

    async def UnloadAdapter(
        self, request: apb.UnloadAdapterRequest, context: grpc.aio.ServicerContext
    ) -> apb.UnloadAdapterResponse:
        replies = await _every(self.cluster, "UnloadAdapter", request, context, apb.UnloadAdapterResponse)
        await self.ledger.unloaded.remote(request.name, request.version, request.model)
        keys = sorted({k for r in replies.values() for k in r.unloaded})
        return apb.UnloadAdapterResponse(unloaded=keys)

    async def PinAdapter(
        self, request: apb.PinAdapterRequest, context: grpc.aio.ServicerContext
    ) -> apb.AdapterInfo:
        replies = await _every(self.cluster, "PinAdapter", request, context, apb.AdapterInfo)
        first = next(iter(replies.values()))
        await self.ledger.pinned.remote(f"{first.name}@{first.version}", request.pinned, request.model)
        return _merged(first, replies)

    async def ListAdapters(
        self, request: apb.ListAdaptersRequest, context: grpc.aio.ServicerContext
    ) -> apb.ListAdaptersResponse:
        replies = await _every(self.cluster, "ListAdapters", request, context, apb.ListAdaptersResponse)
        merged: dict[tuple[str, str], apb.AdapterInfo] = {}
        for rid, reply in sorted(replies.items()):
            for info in reply.adapters:
                key = (info.name, info.version)
                if key not in merged:
                    merged[key] = apb.AdapterInfo()
                    merged[key].CopyFrom(info)
                    merged[key].ClearField("replicas")
                    merged[key].in_flight = merged[key].requests_served = 0
                out = merged[key]
                out.in_flight += info.in_flight
                out.requests_served += info.requests_served
                out.pinned = out.pinned or info.pinned
                out.replicas.add(replica=rid, residency=info.residency)
        return apb.ListAdaptersResponse(adapters=[merged[k] for k in sorted(merged)])


def _merged(first: apb.AdapterInfo, replies: dict[str, apb.AdapterInfo]) -> apb.AdapterInfo:
    out = apb.AdapterInfo()
    out.CopyFrom(first)
    for rid, info in sorted(replies.items()):
        out.replicas.add(replica=rid, residency=info.residency)
    return out
