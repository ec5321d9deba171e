"""The Ray Serve RequestRouter of the cluster: Serve asks it for each call, it asks placement.choose.

NOTE: Ray Serve 2.60's RequestRouter API (choose_replicas, update_replicas, RunningReplica.routing_stats,
replica_queue_len_cache) is what we lean on; pinned by the `ray` extra (ray[serve]==2.60.0). Chosen over
model multiplexing because multiplexing ranks only by "has the model id loaded" (a burst on a new adapter
spreads over every replica before the first load finishes, and it knows no objective); here the router
records an adapter's replica the moment it sends the first request there, ranks by objective from each
replica's live figures, and can also address one replica by id (admin broadcast).

The router lives in the front's process (a handle's router runs beside its caller), so it also publishes
the replicas it sees (`VIEW`) for the front's broadcasts.
NOTE: Serve pickles this module BY VALUE into the router (RequestRouterConfig registers it with
cloudpickle): the class must not reach module state through its globals (that would be a copy, and a lock
does not pickle); it imports this module at call time to reach the real `VIEW`.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

from ray.serve.request_router import PendingRequest, RequestRouter, RunningReplica

from .placement import ReplicaState, Want, choose
from .replica import Route

log = logging.getLogger("effllm.server")


class ReplicaView:
    """The replicas the router last heard of, by id (read by the front from another thread)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._ids: tuple[str, ...] = ()
        self.changed = threading.Event()

    def set(self, ids: list[str]) -> None:
        with self._lock:
            self._ids = tuple(sorted(ids))
        self.changed.set()

    def ids(self) -> tuple[str, ...]:
        with self._lock:
            return self._ids


VIEW = ReplicaView()


def state_of(replica: RunningReplica, ongoing: int | None) -> ReplicaState:
    stats: dict[str, Any] = replica.routing_stats or {}
    slots = max(int(stats.get("slots", 1)), 1)
    total = int(stats.get("running", 0)) + int(stats.get("queued", 0))
    # the router's own count of calls in flight there is fresher than the stats (sent every period)
    total = max(total, ongoing or 0)
    return ReplicaState(
        replica_id=replica.replica_id.unique_id,
        adapters=frozenset(stats.get("adapters", ())),
        running=min(total, slots),
        queued=max(total - slots, 0),
        slots=slots,
        ttft_s=float(stats.get("ttft_s", 0.0)),
        tpot_s=float(stats.get("tpot_s", 0.0)),
        j_per_token=float(stats.get("j_per_token", 0.0)),
    )


class EffllmRouter(RequestRouter):
    def initialize_state(self, **kwargs: Any) -> None:
        self.assigned: dict[str, frozenset[str]] = {}  # adapter -> replicas sent it (loads may be under way)

    def update_replicas(self, replicas: list[RunningReplica]) -> None:
        super().update_replicas(replicas)
        from effllm.server.cluster import routing  # the real module, not the pickled copy (NOTE above)

        routing.VIEW.set([r.replica_id.unique_id for r in replicas])

    async def choose_replicas(
        self, candidate_replicas: list[RunningReplica], pending_request: PendingRequest | None = None
    ) -> list[list[RunningReplica]]:
        route = pending_request.kwargs.get("route") if pending_request is not None else None
        by_id = {r.replica_id.unique_id: r for r in candidate_replicas}
        if not isinstance(route, Route):
            return [candidate_replicas]
        if route.target:
            return [[by_id[route.target]]] if route.target in by_id else []
        cache = self.replica_queue_len_cache
        states = [state_of(r, cache.get(r.replica_id)) for r in candidate_replicas]
        live = set(by_id)
        assigned = {a: ids & live for a, ids in self.assigned.items()}
        placed = choose(states, Want(route.adapter, route.objective or "latency", route.avoid), assigned)
        if placed.assign:
            self.assigned[route.adapter] = assigned.get(route.adapter, frozenset()) | {placed.assign}
            log.info("adapter %s: %s (%s)", route.adapter, placed.assign, placed.why)
        return [[by_id[i]] for i in placed.ranking]
