"""Per-request energy: split a meter's energy among the requests that ran at the same time.

The rule (equal share per busy engine, then per request): the meter is read whenever a request starts or
finishes running (holding a batch slot; queueing is not running). Between two consecutive reads the set of
running requests is constant. Each running request belongs to a group (the variant, i.e. the engine it
runs on, e.g. "int4:hf"); the energy ΔE of the interval is divided equally among the g groups with at
least one running request (ΔE/g each), then equally among that group's n_g running requests
(ΔE/g/n_g each). A request's attributed energy is the sum of its shares over the intervals it ran. With
one group (every single-variant server) this is ΔE/n, the plain equal time share. Energy spent while
nothing runs (idle) goes to no request; it is counted in `idle_j`.
Invariant: Σ attributed + idle_j = the meter's total since the attributor was made (up to float
rounding): every interval's ΔE goes wholly to idle or wholly to the running requests.

Why per engine first: an engine with running rows steps continuously, whatever its batch size, so two
busy engines on the same cores (or the same GPU) each take about an equal share of them; the estimated
meter (CPU seconds × watts per core) sees exactly that. Splitting per request across engines would charge
a request in an int4 batch of 2 beside an fp32 batch of 8 one tenth of the interval, though its engine
burnt about half. Why not weighted by each engine's threads: no variant has a thread count of its own to
weigh by — hf engines share the process-wide torch intra-op pool, and vLLM's CPU workers all take
OMP_NUM_THREADS / VLLM_CPU_OMP_THREADS_BIND from the one server's settings (serve --cpu-omp-bind) — so
equal per busy engine is the honest rule. Within an engine, equal per request: in continuous batching
every running sequence takes part in every decode step, so within an interval each costs about the same;
prefill-heavy requests are the exception and this rule under-charges them. Every figure keeps its meter's
source (measured-* or estimated).
Requests are keyed by (group, request id): the same client request id running on two variants at once
(each runner refuses duplicates only among its own) are two requests here. Thread-safe.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

from .energy import EnergyMeter, Source


@dataclass(frozen=True)
class Attributed:
    joules: float
    source: Source


class EnergyAttributor:
    def __init__(self, meter: EnergyMeter) -> None:
        self.meter = meter
        self._lock = threading.Lock()
        # group -> (request id -> J so far); a group is present only while it has a running request
        self._groups: dict[str, dict[str, float]] = {}
        self._last = meter.read().joules
        self.idle_j = 0.0
        self.attributed_j = 0.0

    @property
    def source(self) -> Source:
        return self.meter.source

    def _tick(self) -> None:
        now = self.meter.read().joules
        delta = max(0.0, now - self._last)
        self._last = now
        if not self._groups:
            self.idle_j += delta
            return
        per_group = delta / len(self._groups)
        for running in self._groups.values():
            share = per_group / len(running)
            for key in running:
                running[key] += share

    def start(self, request_id: str, group: str = "") -> None:
        """`request_id` holds a batch slot on `group`'s engine from now on. A request already running
        keeps running (and what it has accrued)."""
        with self._lock:
            self._tick()
            self._groups.setdefault(group, {}).setdefault(request_id, 0.0)

    def finish(self, request_id: str, group: str = "") -> Attributed:
        """The request's share so far; it stops accruing. Unknown ids get 0 J."""
        with self._lock:
            self._tick()
            running = self._groups.get(group)
            joules = running.pop(request_id, 0.0) if running is not None else 0.0
            if running is not None and not running:
                del self._groups[group]  # an idle engine takes no share of the next interval
            self.attributed_j += joules
            return Attributed(joules, self.meter.source)

    def running(self, group: str | None = None) -> int:
        """Running requests, on every group (None) or on one."""
        with self._lock:
            if group is not None:
                return len(self._groups.get(group, ()))
            return sum(len(running) for running in self._groups.values())

    def busy_groups(self) -> tuple[str, ...]:
        """The groups with at least one running request (each takes an equal share of an interval)."""
        with self._lock:
            return tuple(self._groups)
