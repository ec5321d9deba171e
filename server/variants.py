"""The variants one server hosts: the same base model at several precisions/engines, each its own engine
with its own batch, KV cache and Runner (admission), plus what the router needs to choose among them.

- `LiveFigures`: a variant's exponentially weighted figures (TTFT, prefill, TPOT, J/token, time holding a
  slot, batch size seen), updated by its Runner from every finished request; until the first one, the
  start-up estimates of `measure()` (a few warm-up tokens on an idle engine; J/token from the CPU time
  of this process and its children x watts per core, "estimated": vLLM's engine core is a child).
- `VariantAdapters`: the adapter registry's engine when there are several variants: a version goes to
  every variant that can serve it (method and rank), the others are recorded as skipped with why; a
  failure on one variant removes it again from those that took it, so no variant is left half-loaded.
- `VariantSet`: the variants in order (the first is the default), start-up quality (perplexity on
  common/heldout.py, scored by each variant's own engine), and `choose()` (server/router.py).
Invariant: with one variant nothing is measured at start-up and `choose()` is one attribute lookup when
the request has no budget; with several, `choose()` only ever picks a live variant (`Variant.alive`, asked
at choose time; a variant whose engine died never serves again); no torch here (engines own it).
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

from ..common.budget import Budget
from ..common.heldout import HELD_OUT, perplexity, relative_quality
from ..telemetry.energy import DEFAULT_WATTS_PER_CORE, WATTS_PER_CORE_ENV
from ..telemetry.genai import RouteNote
from ..telemetry.proctree import ProcessTree
from .engines.base import (
    AdapterSpec,
    EffllmError,
    Engine,
    EngineInfo,
    GenerationRequest,
    Sampling,
    TokenEvent,
)
from .router import Candidate, Decision, route

if TYPE_CHECKING:
    from .runner import Runner

log = logging.getLogger("effllm.server")

EWMA_ALPHA = 0.2  # weight of the newest request: about the last 10 requests matter
WARMUP_TOKENS = 8
# Batch slowdown k (router.py): on CPU every row in a step costs a full share of the cores; on a GPU
# decode is memory-bound and a row more costs little.
SLOWDOWN = {"cpu": 1.0, "cuda": 0.1}


def variant_name(info: EngineInfo) -> str:
    return f"{info.precision}:{info.engine}"


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

    def observe(self, event: TokenEvent, batch: int) -> None:
        """Fold one finished request in (the runner calls this once per request, at its final event)."""
        t, u = event.timings, event.usage
        if t is None or u is None or u.output_tokens < 1 or event.finish_reason not in ("length", "stop"):
            return
        first = self.requests == 0  # the first live figure replaces the start-up estimate

        def mix(old: float, new: float) -> float:
            return new if first else old + EWMA_ALPHA * (new - old)

        self.ttft_s = mix(self.ttft_s, t.time_to_first_token_s)
        self.prefill_s = mix(self.prefill_s, max(t.time_to_first_token_s - t.queue_s, 0.0))
        if u.output_tokens > 1:
            self.tpot_s = mix(self.tpot_s, t.decode_s / (u.output_tokens - 1))
        self.service_s = mix(self.service_s, max(t.total_s - t.queue_s, 0.0))
        self.batch_seen = mix(self.batch_seen, float(max(batch, 1)))
        if u.energy_joules is not None:
            self.j_per_token = mix(self.j_per_token, u.energy_joules / u.output_tokens)
            self.energy_source = u.energy_source
        self.requests += 1


@dataclass(eq=False)
class Variant:
    engine: Engine
    runner: Runner
    figures: LiveFigures = field(default_factory=LiveFigures)
    perplexity: float = 0.0  # 0: not measured (a server with one variant)
    quality: float = 1.0
    dead: bool = False  # set by the server's watchdog once its engine died: it never serves again

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
                if probe is not None and not await probe(spec):
                    raise EffllmError(
                        "failed_precondition",
                        f"adapter: {spec.key} refused: its logits on a probe prompt are not finite on "
                        f"{variant_name(engine.info)}",
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
    ) -> None:
        if not variants:
            raise ValueError("a server hosts at least one variant")
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
        decision: Decision = route(objective, budget, held, [v.candidate() for v in live], strict)
        note = RouteNote(
            objective, decision.variant, decision.reason, decision.candidates_json(), decision.budget_met
        )
        return self.by_name[decision.variant], note, decision.budget_met

    async def measure(self, default_max_new_tokens: int) -> None:
        """Start-up figures for routing (only with several variants): each variant's quality on its own
        kernels, and a few warm-up tokens for its cold TTFT, TPOT and J/token."""
        if self.single:
            return
        ppl: dict[str, float] = {}
        for v in self.variants:
            t0 = time.perf_counter()
            ppl[v.name] = await _perplexity(v.engine)
            t1 = time.perf_counter()  # scoring's own time: vLLM's first logprobs request may compile
            await _warm_up(v, default_max_new_tokens)
            f = v.figures
            log.info(
                "variant %s: perplexity %.4f on the held-out set (scored in %.1fs); warm-up TTFT %.3fs, "
                "TPOT %.4fs, ~%.3g J/token (estimated) (%.1fs)",
                v.name,
                ppl[v.name],
                t1 - t0,
                f.prefill_s,
                f.tpot_s,
                f.j_per_token,
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


def _prepared(engine: Engine, prompt: str, max_new_tokens: int) -> GenerationRequest:
    sampling = Sampling(max_new_tokens=max_new_tokens, temperature=0.0, ignore_eos=True)
    return engine.prepare(
        GenerationRequest(request_id=f"warm-up-{time.time_ns()}", sampling=sampling, prompt=prompt)
    )


async def _warm_up(v: Variant, default_max_new_tokens: int) -> None:
    """Two short greedy generations straight on the engine (not through the runner: not a served request);
    the second one is measured (the first pays lazy initialisation). Its CPU time is that of this process
    and its children: vLLM decodes in its engine-core process, and this process's own CPU time would
    leave out nearly all of it (only the other variants' idle engines share the figure)."""
    watts = float(os.environ.get(WATTS_PER_CORE_ENV) or DEFAULT_WATTS_PER_CORE)
    for measured in (False, True):
        request = _prepared(v.engine, HELD_OUT[0][:200], WARMUP_TOKENS)
        tree = ProcessTree()  # CPU seconds from now on, this process and every child
        t0 = time.perf_counter()
        first: float | None = None
        tokens = 0
        async for event in v.engine.generate(request):
            if event.token_ids and first is None:
                first = time.perf_counter()
            tokens += len(event.token_ids)
        end, cpu = time.perf_counter(), tree.cpu_seconds()
        if not measured or first is None or tokens < 2:
            continue
        f = v.figures
        f.prefill_s = f.ttft_s = first - t0
        f.tpot_s = (end - first) / (tokens - 1)
        f.j_per_token = cpu * watts / tokens
        f.energy_source = "estimated"
        f.service_s = f.prefill_s + f.tpot_s * max(default_max_new_tokens - 1, 1)
