"""Energy meters behind one Protocol: NVML, RAPL, or an estimate from CPU time — each reading says which.

`select_meter()` tries, in order: NVML's total-energy counter on NVIDIA GPUs (power polling where the
counter is unsupported), Intel/AMD RAPL package counters in /sys/class/powercap where readable, and
otherwise an estimate = CPU seconds of this process tree × a watts-per-core figure.
Invariants: `read().joules` is cumulative since the meter was made and never decreases; every reading
carries `source`, and only a meter that reads a hardware counter or sensor says "measured-*": the
estimate is always "estimated". A missing pynvml, driver or GPU falls through to the next meter.
"""

from __future__ import annotations

import logging
import os
import re
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Protocol

from .nvml import Gpus, open_gpus
from .proctree import ProcessTree

log = logging.getLogger(__name__)

Source = Literal["measured-nvml", "measured-rapl", "estimated"]
SOURCES: tuple[Source, ...] = ("measured-nvml", "measured-rapl", "estimated")
DEFAULT_WATTS_PER_CORE = 10.0  # a busy server core at ~2-3 GHz; override with EFFLLM_WATTS_PER_CORE
WATTS_PER_CORE_ENV = "EFFLLM_WATTS_PER_CORE"


@dataclass(frozen=True)
class EnergyReading:
    joules: float  # cumulative since the meter was made
    t: float  # time.monotonic() of the reading
    source: Source

    def __post_init__(self) -> None:
        if self.source not in SOURCES:
            raise ValueError(f"source {self.source!r} is not one of {SOURCES}")


class EnergyMeter(Protocol):
    source: Source

    def read(self) -> EnergyReading:
        """Thread-safe; cheap enough to call per request and at 10 Hz."""
        ...

    def close(self) -> None: ...


class NvmlMeter:
    """Sum over the visible GPUs of the driver's energy counter (mJ); where a GPU lacks the counter
    (pre-Volta), a 10 Hz thread integrates its power draw instead. Both are measurements."""

    source: Source = "measured-nvml"

    def __init__(self, gpus: Gpus, poll_hz: float = 10.0) -> None:
        self.gpus = gpus
        self._lock = threading.Lock()
        self._base: dict[int, float] = {}
        self._polled: dict[int, float] = {}  # handle index -> J integrated so far
        for i, h in enumerate(gpus.handles):
            try:
                self._base[i] = gpus.total_energy_j(h)
            except gpus.nvml.NVMLError:
                self._polled[i] = 0.0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        if self._polled:
            log.info(
                "NVML energy counter unsupported on %d GPU(s): integrating power draw", len(self._polled)
            )
            self._thread = threading.Thread(
                target=self._poll, args=(1.0 / poll_hz,), daemon=True, name="effllm-nvml-power"
            )
            self._thread.start()

    def _poll(self, period: float) -> None:
        last_t = time.monotonic()
        last_p = {i: self.gpus.power_w(self.gpus.handles[i]) for i in self._polled}
        while not self._stop.wait(period):
            now = time.monotonic()
            with self._lock:
                for i in self._polled:
                    p = self.gpus.power_w(self.gpus.handles[i])
                    self._polled[i] += (now - last_t) * (p + last_p[i]) / 2.0
                    last_p[i] = p
            last_t = now

    def read(self) -> EnergyReading:
        with self._lock:
            total = sum(self._polled.values())
            for i, base in self._base.items():
                total += self.gpus.total_energy_j(self.gpus.handles[i]) - base
            return EnergyReading(total, time.monotonic(), self.source)

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=1.0)
        self.gpus.close()


_PACKAGE = re.compile(r"^intel-rapl:\d+$")  # top-level package zones; sub-zones (:0:0) are inside them


class RaplMeter:
    """Linux powercap RAPL package counters (µJ), summed over packages, corrected for wraparound."""

    source: Source = "measured-rapl"

    def __init__(self, root: Path | str = "/sys/class/powercap") -> None:
        zones = sorted(p for p in Path(root).glob("intel-rapl:*") if _PACKAGE.match(p.name))
        self._zones: list[tuple[Path, int]] = []
        for zone in zones:
            try:
                max_range = int((zone / "max_energy_range_uj").read_text())
                int((zone / "energy_uj").read_text())  # readable? (root-only on most kernels since 2020)
            except (OSError, ValueError) as err:
                log.debug("RAPL zone %s unreadable: %s", zone, err)
                continue
            self._zones.append((zone / "energy_uj", max_range))
        if not self._zones:
            raise OSError(f"no readable RAPL package zone under {root}")
        self._lock = threading.Lock()
        self._last = [self._raw(path) for path, _ in self._zones]
        self._total_uj = 0

    @staticmethod
    def _raw(path: Path) -> int:
        return int(path.read_text())

    def read(self) -> EnergyReading:
        with self._lock:
            for k, (path, max_range) in enumerate(self._zones):
                now = self._raw(path)
                delta = now - self._last[k]
                if delta < 0:  # the counter wrapped at max_energy_range_uj
                    delta += max_range + 1
                self._total_uj += delta
                self._last[k] = now
            return EnergyReading(self._total_uj / 1e6, time.monotonic(), self.source)

    def close(self) -> None:
        self._zones = []


class CpuTimeEstimateMeter:
    """An estimate, not a measurement: CPU seconds of this process tree × watts per core."""

    source: Source = "estimated"

    def __init__(self, watts_per_core: float | None = None, tree: ProcessTree | None = None) -> None:
        self.watts_per_core = resolve_watts_per_core(watts_per_core)
        self.tree = tree or ProcessTree()

    def read(self) -> EnergyReading:
        return EnergyReading(self.tree.cpu_seconds() * self.watts_per_core, time.monotonic(), self.source)

    def close(self) -> None:
        pass


def resolve_watts_per_core(value: float | None = None) -> float:
    if value is None:
        raw = os.environ.get(WATTS_PER_CORE_ENV)
        try:
            value = float(raw) if raw else DEFAULT_WATTS_PER_CORE
        except ValueError as err:
            raise ValueError(f"{WATTS_PER_CORE_ENV}={raw!r} is not a number") from err
    if not value > 0:
        raise ValueError(f"watts per core must be > 0, got {value}")
    return value


def select_meter(
    prefer: Literal["auto", "nvml", "rapl", "estimate"] = "auto",
    *,
    watts_per_core: float | None = None,
    rapl_root: Path | str = "/sys/class/powercap",
    gpus: Any = None,
    tree: ProcessTree | None = None,
) -> EnergyMeter:
    """The best meter this machine offers (or the one asked for, falling back if it is unavailable).
    `gpus`: an already opened `Gpus` to reuse (None: open NVML here); `tree`: a ProcessTree to share."""
    if prefer in ("auto", "nvml"):
        opened = gpus if gpus is not None else open_gpus()
        if opened is not None:
            return NvmlMeter(opened)
    if prefer in ("auto", "nvml", "rapl"):
        try:
            return RaplMeter(rapl_root)
        except OSError as err:
            log.debug("RAPL unavailable: %s", err)
    return CpuTimeEstimateMeter(watts_per_core, tree)
