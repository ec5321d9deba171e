"""Choose the replica for a request: plain replica states in, a ranking of replica ids out.

Order of preference:
1. a replica that holds the request's adapter, or that was assigned it by an earlier request whose load is
   still under way (so a burst on a new adapter lands on ONE replica, not on all);
2. among those (or among all, when none holds it: then the least loaded one is assigned the adapter), by the
   request's objective from each replica's live figures (LATENCY: predicted TTFT then TPOT; ENERGY: J/token);
3. then by load: (running + queued) / slots.
A replica with work for two rounds of its slots (running + queued >= 2 x slots) is overloaded: the request
spills to the best replica that is not, which then loads the adapter (and becomes a second holder). Below
that a burst waits its turn in the holder's queue: one round of queueing costs less than loading the
adapter again elsewhere and spreading its tenants' residency. Every replica still appears in the ranking,
so the caller can fall back down the list when the first choice refuses.
Invariant: no Ray, no torch, no clock, no I/O; the same inputs give the same ranking.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from ...api.objectives import OBJECTIVES

SPILL_ROUNDS = 2  # a replica with this many rounds of its slots in work sends a request elsewhere


@dataclass(frozen=True)
class ReplicaState:
    """What the router knows of one replica (its `record_routing_stats`, plus the router's own count of
    requests in flight there)."""

    replica_id: str
    adapters: frozenset[str] = frozenset()  # NAME and NAME@VERSION of every routable version it holds
    running: int = 0
    queued: int = 0
    slots: int = 1
    ttft_s: float = 0.0  # its best variant's live figures (0: not measured yet)
    tpot_s: float = 0.0
    j_per_token: float = 0.0

    def __post_init__(self) -> None:
        if self.slots < 1 or self.running < 0 or self.queued < 0:
            raise ValueError("slots >= 1, running >= 0 and queued >= 0 are required")

    @property
    def load(self) -> float:
        return (self.running + self.queued) / self.slots

    @property
    def overloaded(self) -> bool:
        return self.running + self.queued >= SPILL_ROUNDS * self.slots


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
