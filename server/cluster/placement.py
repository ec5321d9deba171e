"""Choose the replica for a request: plain replica states in, a ranking of replica ids out; and the front's
own count of the requests it has in flight on each replica, which is the load the choice ranks by.

Order of preference:
1. a replica that holds the request's adapter, or that was assigned it by an earlier request whose load is
   still under way (so a burst on a new adapter lands on ONE replica, not on all);
2. among those (or among all, when none holds it: then the least loaded one is assigned the adapter), by the
   request's objective from each replica's live figures (LATENCY: predicted TTFT then TPOT; ENERGY: J/token);
3. then by load: requests in flight there / slots.
The load is the front's own count (`Dispatcher`): +1 when it sends a request to a replica, -1 when that call
ends, however it ends (reply, refusal, cancel, deadline, a dead replica). Not the replicas' routing stats:
Ray sends those every half second, so a burst would be placed on figures that predate it (the flaky spill
test). The stats still give what changes slowly: the adapters each replica holds and its live figures.
A replica with work for two rounds of its slots (in flight >= 2 x slots) is overloaded: the request
spills to the best replica that is not, which then loads the adapter (and becomes a second holder). Below
that a burst waits its turn in the holder's queue: one round of queueing costs less than loading the
adapter again elsewhere and spreading its tenants' residency. Every replica still appears in the ranking,
so the caller can fall back down the list when the first choice refuses.
Invariant: no Ray, no torch, no clock, no I/O; the same inputs give the same ranking.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from ...api.objectives import OBJECTIVES

SPILL_ROUNDS = 2  # a replica with this many rounds of its slots in work sends a request elsewhere


@dataclass(frozen=True)
class ReplicaState:
    """What the front knows of one replica: its `record_routing_stats` (adapters, slots, figures) and the
    front's own count of the requests it has in flight there."""

    replica_id: str
    adapters: frozenset[str] = frozenset()  # NAME and NAME@VERSION of every routable version it holds
    in_flight: int = 0  # the front's count (Dispatcher), never the lagging stats
    slots: int = 1
    ttft_s: float = 0.0  # its best variant's live figures (0: not measured yet)
    tpot_s: float = 0.0
    j_per_token: float = 0.0

    def __post_init__(self) -> None:
        if self.slots < 1 or self.in_flight < 0:
            raise ValueError("slots >= 1 and in_flight >= 0 are required")

    @property
    def load(self) -> float:
        return self.in_flight / self.slots

    @property
    def overloaded(self) -> bool:
        return self.in_flight >= SPILL_ROUNDS * self.slots


@dataclass(frozen=True)
class Placement:
    ranking: tuple[str, ...]  # replica ids, best first
    assign: str = ""  # a replica newly assigned the adapter (the caller records it); "" when none
    why: str = ""


@dataclass(frozen=True)
class Want:
    adapter: str = ""  # NAME or NAME@VERSION; "" = the base model
    objective: str = "latency"
    avoid: frozenset[str] = field(default_factory=frozenset)  # replicas that already failed this request

    def __post_init__(self) -> None:
        if self.objective and self.objective not in OBJECTIVES:
            raise ValueError(f"objective {self.objective!r} is not one of {OBJECTIVES}")


def _objective_key(r: ReplicaState, objective: str) -> tuple[float, ...]:
    if objective == "energy":
        return (r.j_per_token, r.ttft_s, r.tpot_s)
    return (r.ttft_s, r.tpot_s)  # latency, and the rest: the fastest answer


def choose(
    replicas: Sequence[ReplicaState], want: Want, assigned: Mapping[str, frozenset[str]] | None = None
) -> Placement:
    """Rank `replicas` for `want`. `assigned`: adapter -> replicas already sent it (loads under way).
    Raises ValueError when there is no replica to choose from."""
    pool = [r for r in replicas if r.replica_id not in want.avoid] or list(replicas)
    if not pool:
        raise ValueError("no replica to choose from")

    def by_load(r: ReplicaState) -> tuple[float, str]:
        return (r.load, r.replica_id)

    def by_objective(r: ReplicaState) -> tuple[object, ...]:
        # load first among overloaded ones; a measured replica's figures next; the id breaks ties
        return (r.overloaded, *_objective_key(r, want.objective), r.load, r.replica_id)

    if not want.adapter:
        ranked = sorted(pool, key=by_objective)
        return Placement(tuple(r.replica_id for r in ranked), why=f"base model, by {want.objective}")
    mine = (assigned or {}).get(want.adapter, frozenset())
    holders = [r for r in pool if want.adapter in r.adapters or r.replica_id in mine]
    others = sorted((r for r in pool if r not in holders), key=by_load)
    free_holders = sorted((r for r in holders if not r.overloaded), key=by_objective)
    if free_holders:
        rest = sorted((r for r in holders if r.overloaded), key=by_load) + others
        return Placement(
            tuple(r.replica_id for r in free_holders + rest), why=f"holds {want.adapter}, by {want.objective}"
        )
    if not others:  # every replica holds it and all are overloaded: the least loaded one queues it
        ranked = sorted(holders, key=by_load)
        return Placement(tuple(r.replica_id for r in ranked), why=f"all hold {want.adapter}, all busy")
    target = others[0]
    if target.overloaded and holders:  # nobody has room: stay with a holder rather than load it again
        ranked = sorted(holders, key=by_load) + others
        return Placement(
            tuple(r.replica_id for r in ranked), why=f"all busy, stays with a {want.adapter} holder"
        )
    why = (
        f"spills {want.adapter} to a free replica"
        if holders
        else f"assigns {want.adapter} to the least loaded"
    )
    ranked = [target, *sorted(holders, key=by_load), *others[1:]]
    return Placement(tuple(r.replica_id for r in ranked), assign=target.replica_id, why=why)


def state_of(replica_id: str, stats: Mapping[str, Any], in_flight: int) -> ReplicaState:
    """A replica's state from its routing stats (replica.Replica.record_routing_stats; {} before the first)
    and the front's count of its requests in flight there."""
    return ReplicaState(
        replica_id=replica_id,
        adapters=frozenset(stats.get("adapters", ())),
        in_flight=in_flight,
        slots=max(int(stats.get("slots", 1)), 1),
        ttft_s=float(stats.get("ttft_s", 0.0)),
        tpot_s=float(stats.get("tpot_s", 0.0)),
        j_per_token=float(stats.get("j_per_token", 0.0)),
    )


class Dispatcher:
    """The front's side of placement: its count of requests in flight per replica and the adapters it has
    assigned to replicas whose load may still be under way. One per front, used from its event loop only.
    Invariant: every `sending` adds one to its replica's count and takes it off when its block ends, however
    it ends; a replica's count never goes below 0, and a replica that left the cluster leaves the counts."""

    def __init__(self) -> None:
        self.in_flight: dict[str, int] = {}
        self.assigned: dict[str, frozenset[str]] = {}  # adapter -> replicas sent it first

    def place(self, stats: Mapping[str, Mapping[str, Any]], want: Want) -> Placement:
        """Rank the replicas in `stats` (replica id -> its routing stats) for `want` by this front's counts;
        records a new assignment. ValueError when there is no replica."""
        live = set(stats)
        for rid in [r for r in self.in_flight if r not in live and self.in_flight[r] == 0]:
            del self.in_flight[rid]  # gone from the cluster, and nothing of ours left there
        assigned = {a: ids & live for a, ids in self.assigned.items()}
        states = [state_of(rid, stats[rid], self.in_flight.get(rid, 0)) for rid in sorted(live)]
        placed = choose(states, want, assigned)
        if placed.assign:
            self.assigned[want.adapter] = assigned.get(want.adapter, frozenset()) | {placed.assign}
        return placed

    @contextmanager
    def sending(self, replica_id: str) -> Iterator[Sent]:
        """Count one request in flight on `replica_id` for the duration of the block."""
        sent = Sent(self, replica_id)
        self._add(replica_id, 1)
        try:
            yield sent
        finally:
            self._add(sent.replica_id, -1)

    def _add(self, replica_id: str, n: int) -> None:
        self.in_flight[replica_id] = max(self.in_flight.get(replica_id, 0) + n, 0)


class Sent:
    """One request counted in flight (Dispatcher.sending), on the replica it is on."""

    def __init__(self, dispatcher: Dispatcher, replica_id: str) -> None:
        self._dispatcher = dispatcher
        self.replica_id = replica_id

    def on(self, replica_id: str) -> None:
        """The request is on `replica_id` after all (Serve passed the front's first choice over, at its
        cap): the count follows it."""
        if replica_id and replica_id != self.replica_id:
            self._dispatcher._add(self.replica_id, -1)
            self._dispatcher._add(replica_id, 1)
            self.replica_id = replica_id


def parse_replicas(spec: str) -> tuple[int, int]:
    """ "N" -> (N, N); "MIN:MAX" -> (MIN, MAX) for autoscaling. ValueError names the flag."""
    lo, sep, hi = spec.strip().partition(":")
    try:
        low, high = int(lo), int(hi) if sep else int(lo)
    except ValueError:
        raise ValueError(f"--replicas {spec!r}: N or MIN:MAX, whole numbers") from None
    if low < 1 or high < low:
        raise ValueError(f"--replicas {spec!r}: 1 <= MIN <= MAX is required")
    return low, high
