"""Per-request energy: split a meter's energy among the requests that ran at the same time.

The rule (equal time share): the meter is read whenever a request starts or finishes running (holding a
batch slot; queueing is not running). Between two consecutive reads the set of running requests is
constant, so the energy ΔE of that interval is divided equally among its n running requests (ΔE/n each).
A request's attributed energy is the sum of its shares over the intervals it ran. Energy spent while
nothing runs (idle) goes to no request; it is counted in `idle_j`. Hence Σ attributed + idle = the
meter's total over the window, exactly.
Why equal shares and not tokens: in continuous batching every running sequence takes part in every
decode step, so within an interval each costs about the same; prefill-heavy requests are the exception
and this rule under-charges them. Every figure keeps its meter's source (measured-* or estimated).
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
        self._running: dict[str, float] = {}  # request id -> J so far
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
        if not self._running:
            self.idle_j += delta
            return
        share = delta / len(self._running)
        for key in self._running:
            self._running[key] += share

    def start(self, request_id: str) -> None:
        with self._lock:
            self._tick()
            self._running[request_id] = 0.0

    def finish(self, request_id: str) -> Attributed:
        """The request's share so far; it stops accruing. Unknown ids get 0 J."""
        with self._lock:
            self._tick()
            joules = self._running.pop(request_id, 0.0)
            self.attributed_j += joules
            return Attributed(joules, self.meter.source)

    def running(self) -> int:
        return len(self._running)
