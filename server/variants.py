"""The variants one server hosts: the same base model at several precisions/engines, each its own engine
with its own batch, KV cache and Runner (admission), plus what the router needs to choose among them.

- `LiveFigures`: a variant's exponentially weighted figures (TTFT, prefill, TPOT, J/token, time holding a
  slot, batch size seen), updated by its Runner from every finished request, each with its spread (the
  quartiles of the last WINDOW per-request values) and sample count; until the first request, the
  start-up figures of `measure()`: the median of START_UP_REPEATS runs, each one request at batch 1 and
  one batch of START_UP_BATCH requests, START_UP_TOKENS greedy tokens each (min/max over the repeats as
  the spread), the variants taking turns repeat by repeat in alternating order. J/token at start-up is
  the engine's OWN CPU time (`Engine.cpu_seconds`: vLLM's engine core, the hf worker thread and its share
  of torch's pool, never a neighbour's) x watts per core, "estimated".
- `VariantAdapters`: the adapter registry's engine when there are several variants: a version goes to
  every variant that can serve it (method and rank), the others are recorded as skipped with why; a
  failure on one variant removes it again from those that took it, so no variant is left half-loaded.
- `VariantSet`: the variants in order (the first is the default), start-up quality (perplexity on
  common/heldout.py, scored by each variant's own engine), and `choose()` (server/router.py), which sends
  at most `explore_share` of the routed requests (counted, not drawn: deterministic) to the stalest
  other variant that meets the request's budget (router.explore), so figures the router stopped
  renewing correct themselves from served traffic.
Invariant: with one variant nothing is measured at start-up and `choose()` is one attribute lookup when
the request has no budget; with several, `choose()` only ever picks a live variant (`Variant.alive`, asked
at choose time; a variant whose engine died never serves again); no torch here (engines own it).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import statistics
import time
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

from ..common.budget import Budget
from ..common.heldout import HELD_OUT, perplexity, relative_quality
from ..telemetry.energy import resolve_watts_per_core
from ..telemetry.genai import RouteNote
from .engines.base import (
    AdapterSpec,
    EffllmError,
    Engine,
    EngineInfo,
    GenerationRequest,
    Sampling,
    TokenEvent,
)
from .router import Candidate, Decision, explore, route

if TYPE_CHECKING:
    from .runner import Runner

log = logging.getLogger("effllm.server")

EWMA_ALPHA = 0.2  # weight of the newest request: about the last 10 requests matter
WINDOW = 32  # per-request values kept for a live figure's spread
START_UP_TOKENS = 32  # per request; ignore_eos, greedy
START_UP_REPEATS = 5  # the median of 5: one restart to the next moved 1.39x with 3 (AMX Xeon, idle)
START_UP_BATCH = 4  # the second batch size (at most the variant's max_concurrency)
EXPLORE_SHARE = 0.02  # of routed requests, at most
SPREAD_FIGURES = ("ttft_s", "prefill_s", "tpot_s", "j_per_token")
# Batch slowdown k (router.py): on CPU every row in a step costs a full share of the cores; on a GPU
# decode is memory-bound and a row more costs little.
SLOWDOWN = {"cpu": 1.0, "cuda": 0.1}


def variant_name(info: EngineInfo) -> str:
    return f"{info.precision}:{info.engine}"


@dataclass(frozen=True)
class Spread:
    """A figure as a measurement: its median, the interval [lo, hi] the router compares, and the number of
    values behind it (0: not measured)."""

    median: float = 0.0
    lo: float = 0.0
    hi: float = 0.0
    samples: int = 0


def spread_of(values: Iterable[float]) -> Spread:
    """Median and interval of `values`: the quartiles from 4 values on, else the min and max."""
    v = sorted(values)
    if not v:
        return Spread()
    if len(v) < 4:
        return Spread(statistics.median(v), v[0], v[-1], len(v))
    q1, q2, q3 = statistics.quantiles(v, n=4, method="inclusive")
    return Spread(q2, q1, q3, len(v))


def _windows() -> dict[str, deque[float]]:
    return {name: deque(maxlen=WINDOW) for name in SPREAD_FIGURES}


@dataclass
class LiveFigures:
    ttft_s: float = 0.0  # as clients see it (queueing included)
    prefill_s: float = 0.0  # time to first token less queueing
    tpot_s: float = 0.0
    j_per_token: float = 0.0
    service_s: float = 0.0  # time a request holds a batch slot
    batch_seen: float = 1.0  # rows in the batch when requests were scheduled
    energy_source: str = ""
    requests: int = 0  # finished requests folded in (0: the figures are start-up estimates)
    newest_s: float = 0.0  # time.monotonic() of the newest value (start-up or request); 0: none
    window: dict[str, deque[float]] = field(default_factory=_windows)  # the last WINDOW per request
    startup: dict[str, Spread] = field(default_factory=dict)  # measure()'s, until the first request
    # This variant's own estimated joules so far (its engine's cpu_seconds() x watts per core): with an
    # estimated meter, live J/token comes from it, so a neighbour that spins (vLLM's engine core between
    # steps) never counts for this variant; None: from each request's attributed energy (the split).
    own_joules: Callable[[], float] | None = field(default=None, repr=False, compare=False)
    _own_mark: tuple[float, int] | None = field(default=None, repr=False, compare=False)
    _own_tokens: int = field(default=0, repr=False, compare=False)

    def spread(self, name: str) -> Spread:
        """Figure `name`'s spread (one of SPREAD_FIGURES): the recent requests', else the start-up one
        (with fewer than 4 requests, the interval spans both); it always holds the figure the router
        uses."""
        point = float(getattr(self, name))
        live, start = self.window[name], self.startup.get(name)
        s = spread_of(live) if live else start
        if s is None:
            return Spread(point, point, point, 0)
        if live and start is not None and len(live) < 4:  # a young live figure: no narrower than start-up
            s = replace(s, lo=min(s.lo, start.lo), hi=max(s.hi, start.hi))
        return replace(s, lo=min(s.lo, point), hi=max(s.hi, point))

    def interval(self, name: str) -> tuple[float, float]:
        s = self.spread(name)
        return s.lo, s.hi

    def _own_j_per_token(self, tokens: int) -> float | None:
        """Joules per token of this variant's own engine since the previous finished request: its CPU
        over that stretch (every request it ran in it, batched or not) over the tokens those requests
        produced. None: no own meter, or no previous mark yet (the first request sets it)."""
        if self.own_joules is None:
            return None
        joules = self.own_joules()
        self._own_tokens += tokens
        mark, self._own_mark = self._own_mark, (joules, self._own_tokens)
        if mark is None or self._own_tokens <= mark[1] or joules < mark[0]:
            return None
        return (joules - mark[0]) / (self._own_tokens - mark[1])

    def observe(self, event: TokenEvent, batch: int) -> None:
        """Fold one finished request in (the runner calls this once per request, at its final event)."""
        t, u = event.timings, event.usage
        if t is None or u is None or u.output_tokens < 1 or event.finish_reason not in ("length", "stop"):
            return
        first = self.requests == 0  # the first live figure replaces the start-up estimate

        def mix(old: float, new: float) -> float:
            return new if first else old + EWMA_ALPHA * (new - old)

        def fold(name: str, value: float) -> None:
            setattr(self, name, mix(getattr(self, name), value))
            self.window[name].append(value)

        fold("ttft_s", t.time_to_first_token_s)
        fold("prefill_s", max(t.time_to_first_token_s - t.queue_s, 0.0))
        if u.output_tokens > 1:
            fold("tpot_s", t.decode_s / (u.output_tokens - 1))
        self.service_s = mix(self.service_s, max(t.total_s - t.queue_s, 0.0))
        self.batch_seen = mix(self.batch_seen, float(max(batch, 1)))
        if self.own_joules is not None and u.energy_source in ("estimated", ""):
            own = self._own_j_per_token(u.output_tokens)
            if own is not None:  # else this was the first request: it set the mark
                fold("j_per_token", own)
                self.energy_source = "estimated"
        elif u.energy_joules is not None:
            fold("j_per_token", u.energy_joules / u.output_tokens)
            self.energy_source = u.energy_source
        self.requests += 1
        self.newest_s = time.monotonic()


@dataclass(eq=False)
class Variant:
    engine: Engine
    runner: Runner
    figures: LiveFigures = field(default_factory=LiveFigures)
    perplexity: float = 0.0  # 0: not measured (a server with one variant)
    quality: float = 1.0
    dead: bool = False  # set by the server's watchdog once its engine died: it never serves again
    explored: int = 0  # requests sent here to refresh its figures (VariantSet.choose)

    @property
    def name(self) -> str:
        return variant_name(self.engine.info)

    @property
    def alive(self) -> bool:
        """Asked at every choice (engine.alive() is cheap): a death routes nothing more here even before
        the watchdog has seen it."""
        return not self.dead and self.engine.alive()

    def candidate(self) -> Candidate:
        f, info = self.figures, self.engine.info
        device = "cuda" if info.device.startswith("cuda") else "cpu"
        return Candidate(
            name=self.name,
            prefill_s=f.prefill_s,
            tpot_s=f.tpot_s,
            j_per_token=f.j_per_token,
            quality=self.quality,
            service_s=f.service_s,
            queued=self.runner.queued,
            running=self.runner.running,
            slots=self.runner.max_concurrency,
            batch_seen=f.batch_seen,
            batch_slowdown=SLOWDOWN[device],
            prefill_range=f.interval("prefill_s"),
            tpot_range=f.interval("tpot_s"),
            j_range=f.interval("j_per_token"),
        )


class VariantAdapters:
    """AdapterHost over several engines (see the module docstring). `held`/`skipped` per NAME@VERSION."""

    def __init__(self, engines: Sequence[Engine]) -> None:
        self.engines = list(engines)
        self.model = getattr(engines[0], "model", None)  # ResolvedModel: the registry validates against it
        self.held: dict[str, tuple[str, ...]] = {}
        self.skipped: dict[str, tuple[str, ...]] = {}
        self.dead: set[str] = set()  # variants whose engine died (VariantSet.mark_dead): loads skip them

    @property
    def info(self) -> EngineInfo:
        """The first engine's, with every adapter method any variant serves and the largest rank: the
        registry validates against it; each engine then checks its own limits."""
        infos = [e.info for e in self.engines]
        methods = tuple(dict.fromkeys(m for i in infos for m in i.adapter_methods))
        return replace(
            infos[0],
            adapter_methods=methods,
            max_adapter_rank=max(i.max_adapter_rank for i in infos),
            max_adapters_per_batch=max(i.max_adapters_per_batch for i in infos),
        )

    def _why_not(self, engine: Engine, spec: AdapterSpec) -> str:
        info = engine.info
        if variant_name(info) in self.dead:
            return f"{variant_name(info)}: its engine died"
        if spec.method not in info.adapter_methods:
            served = ", ".join(info.adapter_methods) or "none"
            return (
                f"{variant_name(info)}: {spec.method} is not served by the {info.engine} engine at "
                f"{info.precision} on {info.device} (it serves {served})"
            )
        if info.max_adapter_rank and spec.rank > info.max_adapter_rank:
            return (
                f"{variant_name(info)}: rank {spec.rank} is over its max_adapter_rank {info.max_adapter_rank}"
            )
        return ""

    async def add_adapter(self, spec: AdapterSpec) -> None:
        took: list[Engine] = []
        skipped: list[str] = []
        try:
            for engine in self.engines:
                why = self._why_not(engine, spec)
                if why:
                    skipped.append(why)
                    continue
                await engine.add_adapter(spec)
                took.append(engine)
                probe = getattr(engine, "probe_adapter", None)
                try:
                    finite = probe is None or await probe(spec)
                    problem = "" if finite else "its logits on a probe prompt are not finite"
                except EffllmError as err:  # the engine's own words: which module, what is wrong
                    problem = err.message
                if problem:
                    raise EffllmError(
                        "failed_precondition",
                        f"adapter: {spec.key} refused: {problem} on {variant_name(engine.info)}",
                    )
        except BaseException:
            for engine in took:  # no variant keeps a version the others refused
                with contextlib.suppress(Exception):
                    await engine.remove_adapter(spec.key)
            raise
        if not took:
            raise EffllmError(
                "failed_precondition", f"adapter: {spec.key}: no variant serves it ({'; '.join(skipped)})"
            )
        self.held[spec.key] = tuple(variant_name(e.info) for e in took)
        self.skipped[spec.key] = tuple(skipped)

    async def remove_adapter(self, key: str) -> None:
        names = set(self.held.pop(key, ()))
        self.skipped.pop(key, None)
        failure: BaseException | None = None
        for engine in self.engines:
            if variant_name(engine.info) in names - self.dead:  # a dead engine has nothing to free
                try:
                    await engine.remove_adapter(key)
                except Exception as exc:  # remove it from the others all the same
                    failure = failure or exc
        if failure is not None:
            raise failure


class VariantSet:
    def __init__(
        self,
        variants: Sequence[Variant],
        default_objective: str = "latency",
        adapters: VariantAdapters | None = None,
        explore_share: float = EXPLORE_SHARE,
    ) -> None:
        if not variants:
            raise ValueError("a server hosts at least one variant")
        if not 0.0 <= explore_share <= 1.0:
            raise ValueError(f"explore_share {explore_share} is not in 0..1")
        names = [v.name for v in variants]
        if len(set(names)) != len(names):
            raise ValueError(f"variants: {', '.join(names)} has a duplicate")
        self.variants = list(variants)
        self.by_name = {v.name: v for v in self.variants}
        self.default = self.variants[0]
        self.default_objective = default_objective
        self.adapters = adapters
        # NAME or NAME@VERSION -> the loaded version a request would get now (AdapterRegistry.peek)
        self.peek: Callable[[str], str | None] | None = None
        self.explore_share = explore_share
        self.routed = 0  # requests routed among several candidates (the base of the exploration share)
        self.explored = 0

    @property
    def single(self) -> bool:
        return len(self.variants) == 1

    def holders(self, key: str) -> tuple[tuple[str, ...], tuple[str, ...]]:
        """(variants holding adapter version `key`, skipped ones with why)."""
        if self.adapters is None:
            return (self.default.name,), ()
        return self.adapters.held.get(key, ()), self.adapters.skipped.get(key, ())

    def mark_dead(self, variant: Variant) -> None:
        """The watchdog saw `variant`'s engine die: it never serves again, nor takes adapters."""
        variant.dead = True
        if self.adapters is not None:
            self.adapters.dead.add(variant.name)

    def states(self) -> dict[str, bool]:
        """Variant name -> alive (GetModelInfo, the effllm.variant.alive gauge)."""
        return {v.name: v.alive for v in self.variants}

    @property
    def queued(self) -> int:
        return sum(v.runner.queued for v in self.variants)

    @property
    def running(self) -> int:
        return sum(v.runner.running for v in self.variants)

    def choose(
        self, objective: str, budget: Budget, adapter: str, strict: bool
    ) -> tuple[Variant, RouteNote, bool | None]:
        """The variant for a request, its route note (span) and whether it met the budget (None: no
        budget). `adapter`: as the request names it ("" base); an adapter not loaded is left to the runner,
        which refuses it. Only live variants are candidates. Raises EffllmError (strict budget, no variant
        holding the adapter; unavailable when every variant that could serve it is dead)."""
        objective = objective or self.default_objective
        if self.single and budget.empty:  # a dead engine fails the request in the runner, UNAVAILABLE
            name = self.default.name
            return self.default, RouteNote(objective, name, "only variant"), None
        held: frozenset[str] | None = None
        key = self.peek(adapter) if adapter and self.peek is not None else None
        if key is not None and self.adapters is not None:
            held = frozenset(self.adapters.held.get(key, ()))
        live = [v for v in self.variants if v.alive]
        dead = [v.name for v in self.variants if v not in live and (held is None or v.name in held)]
        if dead and not [v for v in live if held is None or v.name in held]:
            names = ", ".join(dead)
            raise EffllmError(
                "unavailable",
                f"adapter: {adapter} is held only by variant {names}, whose engine died; retry later"
                if held is not None
                else f"every variant's engine died ({names}); retry later",
            )
        candidates = [v.candidate() for v in live]
        decision: Decision = route(objective, budget, held, candidates, strict)
        decision = self._explore(objective, decision, candidates)
        note = RouteNote(
            objective, decision.variant, decision.reason, decision.candidates_json(), decision.budget_met
        )
        return self.by_name[decision.variant], note, decision.budget_met

    def _explore(self, objective: str, decision: Decision, candidates: Sequence[Candidate]) -> Decision:
        """`decision`, or the same request sent to a stale variant instead (router.explore) while that
        keeps the explored requests at most `explore_share` of the routed ones."""
        if len(decision.predicted) < 2:
            return decision
        self.routed += 1
        if self.explored + 1 > self.explore_share * self.routed:
            return decision
        now = time.monotonic()
        staleness = {
            v.name: (v.figures.requests, now - v.figures.newest_s if v.figures.newest_s else float("inf"))
            for v in self.variants
        }
        name = explore(objective, decision, candidates, staleness)
        if name is None:
            return decision
        self.explored += 1
        self.by_name[name].explored += 1
        samples, age = staleness[name]
        reason = (
            f"explore: refreshing {name}'s figures ({samples} requests, newest {age:.0f} s ago; "
            f"at most {self.explore_share:.0%} of requests); the router chose {decision.variant}: "
            f"{decision.reason}"
        )
        return replace(decision, variant=name, reason=reason)

    async def measure(self, default_max_new_tokens: int, watts_per_core: float | None = None) -> None:
        """Start-up figures for routing (only with several variants): each variant's quality on its own
        kernels, and repeated runs for its TTFT, TPOT and J/token with their spread (module docstring).
        `watts_per_core`: the server's, already resolved (None: resolve_watts_per_core's own default)."""
        if self.single:
            return
        watts = resolve_watts_per_core(watts_per_core)
        ppl: dict[str, float] = {}
        for v in self.variants:
            t0 = time.perf_counter()
            ppl[v.name] = await _perplexity(v.engine)
            # scoring's own time: vLLM's first logprobs request may compile
            log.info("variant %s: held-out set scored in %.1fs", v.name, time.perf_counter() - t0)
        t1 = time.perf_counter()
        await _warm_up(self.variants, default_max_new_tokens, watts)
        for v in self.variants:
            f = v.figures
            tpot, joules = f.spread("tpot_s"), f.spread("j_per_token")
            log.info(
                "variant %s: perplexity %.4f on the held-out set; start-up TTFT %.3fs, "
                "TPOT %.4fs (%.4f-%.4f), ~%.3g J/token (%.3g-%.3g, estimated at %g W/core), median of %d "
                "repeats (every variant's, alternating: %.1fs)",
                v.name,
                ppl[v.name],
                f.prefill_s,
                f.tpot_s,
                tpot.lo,
                tpot.hi,
                f.j_per_token,
                joules.lo,
                joules.hi,
                watts,
                joules.samples,
                time.perf_counter() - t1,
            )
        for name, quality in relative_quality(ppl).items():
            self.by_name[name].perplexity = ppl[name]
            self.by_name[name].quality = quality


async def _perplexity(engine: Engine) -> float:
    scored = []
    for text in HELD_OUT:
        ids = _prepared(engine, text, 1).prompt_ids or ()
        scored.append(await engine.score(ids))
    return perplexity(scored)[0]


def _prepared(engine: Engine, prompt: str, max_new_tokens: int, request_id: str = "") -> GenerationRequest:
    sampling = Sampling(max_new_tokens=max_new_tokens, temperature=0.0, ignore_eos=True)
    return engine.prepare(
        GenerationRequest(
            request_id=request_id or f"warm-up-{time.time_ns()}", sampling=sampling, prompt=prompt
        )
    )


@dataclass(frozen=True)
class _Run:
    prefill_s: float  # mean time to the first token
    tpot_s: float  # mean time per token after the first
    cpu_s: float  # the engine's own CPU over the run
    tokens: int


async def _run(engine: Engine, batch: int, tokens: int) -> _Run:
    """`batch` greedy requests of `tokens` tokens each, started together, straight on the engine (not
    through the runner: not served requests)."""
    requests = [
        _prepared(engine, HELD_OUT[i % len(HELD_OUT)][:200], tokens, f"warm-up-{i}-{time.time_ns()}")
        for i in range(batch)
    ]
    cpu0, t0 = engine.cpu_seconds(), time.perf_counter()

    async def one(request: GenerationRequest) -> tuple[float, float, int]:
        first: float | None = None
        n = 0
        async for event in engine.generate(request):
            if event.token_ids and first is None:
                first = time.perf_counter()
            n += len(event.token_ids)
        end = time.perf_counter()
        first = end if first is None else first
        return first - t0, (end - first) / max(n - 1, 1), n

    done = await asyncio.gather(*(one(r) for r in requests))
    cpu = engine.cpu_seconds() - cpu0
    return _Run(
        statistics.fmean(d[0] for d in done),
        statistics.fmean(d[1] for d in done),
        cpu,
        sum(d[2] for d in done),
    )


async def _warm_up(variants: Sequence[Variant], default_max_new_tokens: int, watts: float) -> None:
    """START_UP_REPEATS repeats, each one request at batch 1 (its TTFT, TPOT and J/token: the router's
    figures are per batch-1 row, `batch_seen` 1, and live figures from lone requests compare with them)
    and one batch of START_UP_BATCH (its J/token logged beside), after one unmeasured batch that pays
    lazy initialisation. The variants take turns, repeat by repeat, in alternating order, so a stretch of
    a busier machine falls on every variant's repeats rather than on all of one's. The figures are the
    medians, the spreads min..max over the repeats. J/token counts the engine's own CPU
    (Engine.cpu_seconds) only: another variant's engine spinning beside it (vLLM's engine core polls
    between steps) is not this variant's cost."""

    def wide(v: Variant) -> int:
        slots = v.runner.max_concurrency if v.runner is not None else START_UP_BATCH
        return max(1, min(START_UP_BATCH, slots))

    for v in variants:
        await _run(v.engine, wide(v), 4)
    samples: dict[str, dict[str, list[float]]] = {v.name: {n: [] for n in SPREAD_FIGURES} for v in variants}
    batched_j: dict[str, list[float]] = {v.name: [] for v in variants}  # J/token at batch `wide`
    for repeat in range(START_UP_REPEATS):
        for v in variants if repeat % 2 == 0 else list(variants)[::-1]:
            alone = await _run(v.engine, 1, START_UP_TOKENS)
            batched = await _run(v.engine, wide(v), START_UP_TOKENS) if wide(v) > 1 else None
            if alone.tokens < 2:
                continue
            mine = samples[v.name]
            mine["ttft_s"].append(alone.prefill_s)
            mine["prefill_s"].append(alone.prefill_s)
            mine["tpot_s"].append(alone.tpot_s)
            # J/token of a batch-1 row, as the live figures a lone request then yields: a figure from the
            # batch (cheaper per token) beside another variant's live batch-1 figure would favour it unfairly
            mine["j_per_token"].append(alone.cpu_s * watts / alone.tokens)
            if batched is not None and batched.tokens:
                batched_j[v.name].append(batched.cpu_s * watts / batched.tokens)
    for v in variants:
        mine = samples[v.name]
        if not mine["tpot_s"]:
            continue
        f = v.figures
        f.startup = {name: spread_of(values) for name, values in mine.items()}
        for name in SPREAD_FIGURES:
            setattr(f, name, f.startup[name].median)
        f.energy_source = "estimated"
        f.service_s = f.prefill_s + f.tpot_s * max(default_max_new_tokens - 1, 1)
        f.newest_s = time.monotonic()
        if batched_j[v.name]:
            log.info(
                "variant %s: start-up J/token %.3g at batch 1, %.3g at batch %d (median of %d)",
                v.name,
                f.j_per_token,
                statistics.median(batched_j[v.name]),
                wide(v),
                len(batched_j[v.name]),
            )
