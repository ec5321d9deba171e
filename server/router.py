"""Pick the variant that serves a request best for its objective, from live figures and the current load.

`route(objective, budget, adapter_variants, candidates)` is pure: plain data in, a `Decision` out. The
`Budget` is common/budget.py's (load campaigns send the same one).

Prediction under load (what each candidate would deliver to this request if it were sent there now):
- A batched engine's step time grows with the rows in the batch: step(n) = s1 * (1 + k * (n - 1)), with
  k the engine's batch slowdown (1: compute-bound, every row costs a full share, as on CPU; near 0:
  memory-bound decode, as on a GPU). The live TPOT was measured at an average batch of `batch_seen`
  rows; this request would join a batch of n = min(running + 1, slots) rows, so
      TPOT_pred = tpot * (1 + k * (n - 1)) / (1 + k * (batch_seen - 1)).
- Its prefill runs in a step shared with the same batch, so it scales the same way; and when every slot
  is taken it first waits for (running + queued - slots + 1) departures, which come at slots / service_s
  per second (service_s: the live mean time a request holds a slot):
      TTFT_pred = prefill * factor + max(0, running + queued - slots + 1) * service_s / slots.
- Joules per token are the live attributed figure (energy already shared among the rows that ran with
  each request); quality is the start-up measurement.
Before a variant has served anything its figures are the start-up estimates (the median of repeated
runs). Each figure may come with an interval [lo, hi] (its spread: start-up repeats, or the recent
requests); without one, the interval is the figure itself.

Then: keep the variants holding the request's adapter; of those, the ones whose prediction meets every
budget field; rank them by the objective (LATENCY: TTFT then TPOT; ENERGY: J/token then TTFT; QUALITY:
the variants as good as the best one (within common/heldout.QUALITY_RESOLUTION: the held-out set cannot
tell fp32 from bf16) by TTFT then TPOT, then the rest by quality; BALANCED: the product of TTFT, TPOT,
J/token and 1/quality, each relative to the best candidate). Ties: for LATENCY and ENERGY the ranked
figure (predicted TTFT; J/token) is a measurement with an error bar, so every candidate whose interval
overlaps the best one's is as good, and the tie goes by the other figures (LATENCY: TPOT, then J/token;
ENERGY: TTFT, then TPOT), as QUALITY's ties already do; a variant that would wait for a free slot never
ties with one that would not (queueing is load, not noise). None meets the budget: the closest one
(smallest summed relative excess) with budget_met=False, or, with `strict`, FAILED_PRECONDITION naming
the budget field and nothing runs.

`explore(decision, candidates, staleness)` names the variant a request may go to instead, to refresh
figures the router has stopped renewing (the caller bounds how often it asks, server/variants.py): one
that holds the adapter, meets the request's budget (nothing when no variant meets it), has a free slot
and nobody queued, and for QUALITY is as good as the chosen one; of those, the fewest samples, then the
oldest newest sample.
Invariant: no torch, no I/O, no clock; the same inputs give the same decision.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from ..api.errors import EffllmError
from ..api.objectives import OBJECTIVES
from ..common.budget import WIRE_FIELDS, Budget
from ..common.heldout import equally_good

_EPS = 1e-12


# The wire names of the budget fields (GenerateRequest.budget.*): refusals name them.
BUDGET_FIELDS = {name: f"budget.{wire}" for name, wire in WIRE_FIELDS.items()}


@dataclass(frozen=True)
class Candidate:
    """One variant's live figures and load, as the router sees them."""

    name: str
    prefill_s: float  # EWMA time to first token less queueing (s)
    tpot_s: float  # EWMA time per output token after the first (s)
    j_per_token: float  # EWMA attributed joules per output token
    quality: float  # best perplexity / this one's, 0..1
    service_s: float  # EWMA time a request holds a batch slot (s)
    queued: int
    running: int
    slots: int
    batch_seen: float = 1.0  # EWMA rows in the batch when the figures above were measured (>= 1)
    batch_slowdown: float = 1.0  # k above
    # Each figure's interval [lo, hi] (its spread); None: the figure alone
    prefill_range: tuple[float, float] | None = None
    tpot_range: tuple[float, float] | None = None
    j_range: tuple[float, float] | None = None


@dataclass(frozen=True)
class Prediction:
    name: str
    ttft_s: float
    tpot_s: float
    j_per_token: float
    quality: float
    misses: tuple[str, ...]  # the Budget field names it would not meet
    ttft_range: tuple[float, float] = (0.0, 0.0)
    j_range: tuple[float, float] = (0.0, 0.0)
    waits: bool = False  # every slot is taken: it would first wait for a departure

    @property
    def meets(self) -> bool:
        return not self.misses


@dataclass(frozen=True)
class Decision:
    variant: str
    reason: str
    budget_met: bool | None  # None: the request had no budget
    predicted: tuple[Prediction, ...]  # every candidate that holds the adapter

    def candidates_json(self) -> str:
        """The predictions as one compact JSON string (a span attribute)."""
        return json.dumps(
            {
                p.name: {
                    "ttft_s": round(p.ttft_s, 6),
                    "tpot_s": round(p.tpot_s, 6),
                    "j_per_token": round(p.j_per_token, 6),
                    "quality": round(p.quality, 4),
                    "meets_budget": p.meets,
                }
                for p in self.predicted
            },
            separators=(",", ":"),
        )


def predict(c: Candidate, budget: Budget) -> Prediction:
    """What `c` would deliver to one more request now (see the module docstring)."""
    k = max(c.batch_slowdown, 0.0)
    slots = max(c.slots, 1)
    rows = min(c.running + 1, slots)  # a request that waited joins as another leaves: still `slots` rows
    seen = max(c.batch_seen, 1.0)
    factor = (1.0 + k * (rows - 1)) / (1.0 + k * (seen - 1.0))
    ahead = max(0, c.running + c.queued - slots + 1)
    ttft = c.prefill_s * factor + ahead * c.service_s / slots
    tpot = c.tpot_s * factor
    misses = []
    if budget.max_ttft_s is not None and ttft > budget.max_ttft_s:
        misses.append("max_ttft_s")
    if budget.max_tpot_s is not None and tpot > budget.max_tpot_s:
        misses.append("max_tpot_s")
    if budget.max_j_per_token is not None and c.j_per_token > budget.max_j_per_token:
        misses.append("max_j_per_token")
    if budget.min_quality is not None and c.quality < budget.min_quality:
        misses.append("min_quality")
    lo, hi = c.prefill_range or (c.prefill_s, c.prefill_s)
    wait = ttft - c.prefill_s * factor
    ttft_range = (min(lo * factor + wait, ttft), max(hi * factor + wait, ttft))
    j_lo, j_hi = c.j_range or (c.j_per_token, c.j_per_token)
    j_range = (min(j_lo, c.j_per_token), max(j_hi, c.j_per_token))
    return Prediction(
        c.name, ttft, tpot, c.j_per_token, c.quality, tuple(misses), ttft_range, j_range, ahead > 0
    )


def _excess(p: Prediction, budget: Budget) -> float:
    """How far `p` is from meeting the budget: the sum of each missed field's relative excess."""
    total = 0.0
    for name in p.misses:
        if name == "min_quality":
            limit, value = budget.min_quality or 0.0, p.quality
            total += limit / max(value, _EPS) - 1.0
        else:
            limit = getattr(budget, name)
            value = {"max_ttft_s": p.ttft_s, "max_tpot_s": p.tpot_s, "max_j_per_token": p.j_per_token}[name]
            total += value / max(limit, _EPS) - 1.0
    return total


def _rank_key(objective: str, preds: Sequence[Prediction]) -> dict[str, tuple[float, ...]]:
    if objective == "latency":
        return {p.name: (p.ttft_s, p.tpot_s) for p in preds}
    if objective == "energy":
        return {p.name: (p.j_per_token, p.ttft_s) for p in preds}
    if objective == "quality":
        top = max(p.quality for p in preds)
        return {
            p.name: (0.0, p.ttft_s, p.tpot_s)
            if equally_good(p.quality, top)
            else (1.0 - p.quality, p.ttft_s, p.tpot_s)
            for p in preds
        }
    # balanced: each figure relative to the best candidate's, multiplied (1.0 = best at everything)
    best_ttft = min(p.ttft_s for p in preds)
    best_tpot = min(p.tpot_s for p in preds)
    best_j = min(p.j_per_token for p in preds)
    best_q = max(p.quality for p in preds)

    def rel(value: float, best: float) -> float:
        return max(value, _EPS) / max(best, _EPS)

    return {
        p.name: (
            rel(p.ttft_s, best_ttft)
            * rel(p.tpot_s, best_tpot)
            * rel(p.j_per_token, best_j)
            * rel(best_q, p.quality),
            p.ttft_s,
        )
        for p in preds
    }


_WHAT = {
    "latency": "lowest predicted time to first token",
    "energy": "lowest joules per token",
    "quality": "highest quality (ties within the held-out resolution: lowest predicted time to first token)",
    "balanced": "best product of relative latency, energy and quality",
}


def route(
    objective: str,
    budget: Budget,
    adapter_variants: frozenset[str] | None,
    candidates: Sequence[Candidate],
    strict: bool = False,
) -> Decision:
    """The variant for one request. `adapter_variants`: the variants holding its adapter (None: base
    model, every variant). Raises EffllmError failed_precondition when no candidate holds the adapter, or
    when `strict` and none meets the budget (naming the budget field); invalid_argument for an unknown
    objective."""
    if objective not in OBJECTIVES:
        raise EffllmError(
            "invalid_argument", f"objective: {objective!r} is not one of {', '.join(OBJECTIVES)}"
        )
    pool = [c for c in candidates if adapter_variants is None or c.name in adapter_variants]
    if not pool:
        raise EffllmError("failed_precondition", "adapter: no variant of this server holds it")
    preds = tuple(predict(c, budget) for c in pool)
    has_budget = not budget.empty
    meeting = [p for p in preds if p.meets]
    if not meeting:
        if strict:
            closest = min(preds, key=lambda p: _excess(p, budget))
            field = closest.misses[0]
            limit = getattr(budget, field)
            raise EffllmError(
                "failed_precondition",
                f"{BUDGET_FIELDS[field]}: {limit:g} is met by no variant (closest: {closest.name}, "
                f"predicted {_figure(closest, field):.4g}); nothing was run (strict_budget)",
            )
        closest = min(preds, key=lambda p: (_excess(p, budget), _rank_key(objective, preds)[p.name]))
        missed = ", ".join(BUDGET_FIELDS[f] for f in closest.misses)
        return Decision(
            closest.name, f"{objective}: no variant meets the budget; closest ({missed})", False, preds
        )
    keys = _rank_key(objective, meeting)
    best = min(meeting, key=lambda p: (keys[p.name], p.name))
    tied = _tied(objective, best, meeting)
    if len(tied) > 1:
        best = min(tied, key=lambda p: (_TIE_BREAK[objective](p), p.name))
    if len(pool) == 1:
        reason = "only variant" if adapter_variants is None else "only variant holding the adapter"
    else:
        scope = f"{len(meeting)} of {len(pool)} meeting the budget" if has_budget else f"{len(pool)} variants"
        reason = f"{objective}: {_WHAT[objective]} among {scope}"
        if len(tied) > 1:
            reason += f" ({len(tied)} tied within their spread: {_TIE_WHAT[objective]})"
    return Decision(best.name, reason, True if has_budget else None, preds)


# LATENCY and ENERGY: the ranked figure's interval, and what breaks a tie on it
_RANGE = {"latency": lambda p: p.ttft_range, "energy": lambda p: p.j_range}
_TIE_BREAK = {
    "latency": lambda p: (p.tpot_s, p.j_per_token),
    "energy": lambda p: (p.ttft_s, p.tpot_s),
}
_TIE_WHAT = {"latency": "lowest predicted TPOT", "energy": "lowest predicted TTFT"}


def _tied(objective: str, best: Prediction, meeting: Sequence[Prediction]) -> list[Prediction]:
    """The candidates whose interval of the ranked figure overlaps `best`'s (`best` included)."""
    interval = _RANGE.get(objective)
    if interval is None:
        return [best]
    lo, hi = interval(best)
    # waiting for a slot is not measurement noise: a variant that would wait never ties with a free one
    return [p for p in meeting if interval(p)[0] <= hi and lo <= interval(p)[1] and p.waits == best.waits]


def explore(
    objective: str,
    decision: Decision,
    candidates: Sequence[Candidate],
    staleness: Mapping[str, tuple[int, float]],
) -> str | None:
    """A variant other than `decision.variant` worth sending this request to, to refresh its figures, or
    None (see the module docstring). `staleness`: name -> (samples so far, age of the newest in s)."""
    if decision.budget_met is False:  # no variant meets the budget: never trade a miss for freshness
        return None
    free = {c.name for c in candidates if c.queued == 0 and c.running < max(c.slots, 1)}
    chosen = next(p for p in decision.predicted if p.name == decision.variant)
    eligible = [
        p.name
        for p in decision.predicted
        if p.name != decision.variant
        and p.meets
        and p.name in free
        # a QUALITY request is never sent to a variant the held-out set can tell is worse
        and (objective != "quality" or equally_good(p.quality, chosen.quality))
    ]
    if not eligible:
        return None
    return min(eligible, key=lambda n: (staleness.get(n, (0, 0.0))[0], -staleness.get(n, (0, 0.0))[1], n))


def _figure(p: Prediction, field: str) -> float:
    return {
        "max_ttft_s": p.ttft_s,
        "max_tpot_s": p.tpot_s,
        "max_j_per_token": p.j_per_token,
        "min_quality": p.quality,
    }[field]
