"""What a training run costs: memory, utilisation and energy over the run, from a background sampler.

`start_meter()` uses effllm.telemetry's `Measurement` (NVML / RAPL / CPU-time estimate, 10 Hz sampler, the
EfficientLLM formulas) when that package is present, else the minimal stand-in `RunMeter` below; the tuner
sees only `start_meter().stop() -> Usage` either way.
Invariant: energy carries its source; with no hardware counter readable it is `estimated` (process CPU time
x watts per core) and is never reported as measured.
"""

from __future__ import annotations

import os
import threading
import time
from dataclasses import asdict, dataclass
from typing import Any

import psutil

WATTS_PER_CORE = float(os.environ.get("EFFLLM_WATTS_PER_CORE", "10.0"))


@dataclass(frozen=True)
class Usage:
    duration_s: float
    peak_memory_gb: float  # process RSS (+ CUDA peak when on a GPU)
    amu_gb: float  # EfficientLLM AMU for training: time-averaged memory in use, GB
    pcu: float  # EfficientLLM PCU: time-averaged utilisation of the compute in use, 0..1
    energy_j: float
    mean_power_w: float  # EfficientLLM AEC: average power
    energy_source: str  # "estimated" | "measured-rapl" | "measured-nvml"
    samples: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class RunMeter:
    """start(); ...work...; stop() -> Usage. Samples every `interval_s` in a daemon thread."""

    def __init__(self, interval_s: float = 0.5) -> None:
        self.interval_s = interval_s
        self._proc = psutil.Process()
        self._ncpu = max(
            1,
            len(self._proc.cpu_affinity() or [])
            if hasattr(self._proc, "cpu_affinity")
            else psutil.cpu_count() or 1,
        )
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._mem: list[float] = []
        self._util: list[float] = []
        self._peak = 0.0

    def start(self) -> RunMeter:
        self._t0 = time.perf_counter()
        self._cpu0 = self._cpu_seconds()
        self._last = (self._t0, self._cpu0)
        self._sample()
        self._thread = threading.Thread(target=self._run, name="effllm-tuner-meter", daemon=True)
        self._thread.start()
        return self

    def _cpu_seconds(self) -> float:
        t = self._proc.cpu_times()
        return float(t.user + t.system)

    def _sample(self) -> None:
        now, cpu = time.perf_counter(), self._cpu_seconds()
        rss = self._proc.memory_info().rss / 1e9
        self._mem.append(rss)
        self._peak = max(self._peak, rss)
        t_prev, cpu_prev = self._last
        if now > t_prev:
            self._util.append(min(1.0, (cpu - cpu_prev) / (now - t_prev) / self._ncpu))
        self._last = (now, cpu)

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self._sample()

    def stop(self) -> Usage:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self._sample()
        duration = time.perf_counter() - self._t0
        cpu = self._cpu_seconds() - self._cpu0
        energy = cpu * WATTS_PER_CORE
        return Usage(
            duration_s=duration,
            peak_memory_gb=self._peak,
            amu_gb=sum(self._mem) / len(self._mem),
            pcu=sum(self._util) / len(self._util) if self._util else 0.0,
            energy_j=energy,
            mean_power_w=energy / duration if duration > 0 else 0.0,
            energy_source="estimated",
            samples=len(self._mem),
        )


class TelemetryMeter:
    """effllm.telemetry.sampler.Measurement behind the same start/stop -> Usage interface."""

    def __init__(self, measurement_cls: Any) -> None:
        self._m = measurement_cls(hz=2.0)

    def start(self) -> TelemetryMeter:
        self._m.__enter__()
        return self

    def stop(self) -> Usage:
        self._m.__exit__(None, None, None)
        s = self._m.summary
        return Usage(
            duration_s=s.duration_s,
            peak_memory_gb=s.peak_memory_bytes / 1e9,
            amu_gb=s.amu_bytes / 1e9,
            pcu=s.pcu,
            energy_j=s.energy_j,
            mean_power_w=s.aec_w,
            energy_source=str(s.energy_source),
            samples=s.samples,
        )


def start_meter() -> RunMeter | TelemetryMeter:
    try:
        from effllm.telemetry.sampler import Measurement
    except ImportError:  # telemetry/ not in this checkout: the stand-in
        return RunMeter().start()
    return TelemetryMeter(Measurement).start()
