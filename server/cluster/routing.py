"""The Ray Serve RequestRouter of the cluster: it sends each call where the front placed it, and publishes
the replicas and their routing stats to the front.

The front chooses (placement.Dispatcher: its own in-flight counts, the stats' adapters and figures) and
puts its ranking on the call (`Route.ranking`); this router hands that ranking to Serve, one replica per
rank, so Serve tries the front's first choice first and falls down the list only when a replica is at its
`max_ongoing_requests` cap. A call with `Route.target` (admin broadcast, per-replica stats) goes to that
replica only.
NOTE: Ray Serve 2.60's RequestRouter API (choose_replicas, update_replicas, RunningReplica.routing_stats) is
what we lean on; pinned by the `ray` extra (ray[serve]==2.60.0). Chosen over model multiplexing because
multiplexing ranks only by "has the model id loaded" (a burst on a new adapter spreads over every replica
before the first load finishes, and it knows no objective).

The router lives in the front's process (a handle's router runs beside its caller, on Serve's own event loop
thread), so it publishes what it sees (`VIEW`) for the front to read.
NOTE: Serve pickles this module BY VALUE into the router (RequestRouterConfig registers it with
cloudpickle): the class must not reach module state through its globals (that would be a copy, and a lock
does not pickle); it imports this module at call time to reach the real `VIEW`.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping
from typing import Any

from ray.serve.request_router import PendingRequest, RequestRouter, RunningReplica

from .replica import Route


class ReplicaView:
    """The replicas the router last heard of: id -> its routing stats (read by the front, another thread)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._stats: dict[str, Mapping[str, Any]] = {}

    def set(self, replicas: list[RunningReplica]) -> None:
        stats: dict[str, Mapping[str, Any]] = {
            r.replica_id.unique_id: dict(r.routing_stats or {}) for r in replicas
        }
        with self._lock:
            self._stats = stats

    def stats(self) -> dict[str, Mapping[str, Any]]:
        with self._lock:
            return dict(self._stats)

    def ids(self) -> tuple[str, ...]:
        with self._lock:
            return tuple(sorted(self._stats))


VIEW = ReplicaView()


class EffllmRouter(RequestRouter):
    def update_replicas(self, replicas: list[RunningReplica]) -> None:
        super().update_replicas(replicas)
        from effllm.server.cluster import routing  # the real module, not the pickled copy (NOTE above)

        routing.VIEW.set(replicas)

    async def choose_replicas(
        self, candidate_replicas: list[RunningReplica], pending_request: PendingRequest | None = None
    ) -> list[list[RunningReplica]]:
        route = pending_request.kwargs.get("route") if pending_request is not None else None
        if not isinstance(route, Route):
            return [candidate_replicas]
        by_id = {r.replica_id.unique_id: r for r in candidate_replicas}
        if route.target:
            return [[by_id[route.target]]] if route.target in by_id else []
        ranked = [[by_id[i]] for i in route.ranking if i in by_id]
        return ranked or [candidate_replicas]  # the front's view predates a replacement: any will do
