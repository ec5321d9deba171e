"""A background thread that samples memory, utilisation, power and energy (default 10 Hz), and
`Measurement`, the one-line way to get AMU / PCU / AEC / J over a window of code.

Each `Sample` holds the raw figures plus the two the EfficientLLM formulas use:
  memory_utilisation: GPU memory used/total where NVML sees GPUs, else this process tree's RSS / RAM
                      (the tree, not the whole machine, so other tenants do not count as ours);
  utilisation:        GPU utilisation where NVML sees GPUs, else the tree's CPU time / (wall × cores).
Power is the energy meter's ΔJ/Δt between samples, so it always has the meter's source.
Cost (it runs inside the server): CPU time, energy and GPU figures are read every sample; RSS and
system memory about once a second, when the JSONL file is also flushed (~0.3 ms a sample on a busy
2-core machine, i.e. < 0.5 % of one core at 10 Hz).
Invariant: samples are appended in time order (t is Unix seconds); the JSONL file, when asked for,
holds exactly the samples in memory, one JSON object a line, flushed per line.

    with Measurement() as m:        # the tuner's API
        train_step()
    print(m.summary.amu, m.summary.pcu, m.summary.aec_w, m.summary.energy_j, m.summary.energy_source)
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import psutil

from . import metrics
from .energy import EnergyMeter, Source, select_meter
from .nvml import Gpus, open_gpus
from .proctree import ProcessTree

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Sample:
    t: float  # Unix seconds
    memory_utilisation: float  # 0..1 (see the module docstring for what is counted)
    utilisation: float  # 0..1
    power_w: float
    energy_j: float  # cumulative since the sampler started
    energy_source: Source
    rss_bytes: int
    system_memory_used_bytes: int
    system_memory_total_bytes: int
    cpu_utilisation: float  # this process tree, 0..1 of all cores
    gpu_memory_used_bytes: int = 0
    gpu_memory_total_bytes: int = 0
    gpu_utilisation: float = 0.0

    @property
    def memory_used_bytes(self) -> int:
        return self.gpu_memory_used_bytes if self.gpu_memory_total_bytes else self.rss_bytes

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Sample:
        names = cls.__dataclass_fields__
        return cls(**{k: v for k, v in d.items() if k in names})


@dataclass(frozen=True)
class WindowSummary:
    """The EfficientLLM resource metrics over one window of samples."""

    start: float  # Unix seconds
    end: float
    samples: int
    amu: float  # time-averaged memory utilisation, 0..1
    amu_bytes: float  # time-averaged memory in use, bytes (the training variant)
    peak_memory_bytes: int
    pcu: float  # time-averaged utilisation, 0..1
    aec_w: float  # time-averaged power, W
    energy_j: float
    energy_source: Source
    device: str  # "cuda" when NVML saw GPUs, else "cpu"

    @property
    def duration_s(self) -> float:
        return self.end - self.start


def summarize(
    samples: Sequence[Sample], start: float | None = None, end: float | None = None
) -> WindowSummary:
    """AMU, PCU, AEC and energy over the samples with start <= t <= end (all by default)."""
    picked = [s for s in samples if (start is None or s.t >= start) and (end is None or s.t <= end)]
    if not picked:
        raise ValueError("summarize: no samples in the window")
    sources = {s.energy_source for s in picked}
    if len(sources) != 1:
        raise ValueError(f"summarize: samples mix energy sources {sorted(sources)}")
    return WindowSummary(
        start=picked[0].t,
        end=picked[-1].t,
        samples=len(picked),
        amu=metrics.time_average([(s.t, s.memory_utilisation) for s in picked]),
        amu_bytes=metrics.amu([(s.t, float(s.memory_used_bytes)) for s in picked]),
        peak_memory_bytes=max(s.memory_used_bytes for s in picked),
        pcu=metrics.pcu([(s.t, s.utilisation) for s in picked]),
        aec_w=metrics.aec([(s.t, s.power_w) for s in picked]),
        energy_j=picked[-1].energy_j - picked[0].energy_j,
        energy_source=picked[0].energy_source,
        device="cuda" if picked[0].gpu_memory_total_bytes else "cpu",
    )


class ResourceSampler:
    """Samples every 1/hz seconds on a daemon thread until `stop()`; keeps up to `max_samples` in
    memory (oldest dropped) and, with `path`, appends each sample to a JSONL file."""

    def __init__(
        self,
        hz: float = 10.0,
        *,
        meter: EnergyMeter | None = None,
        gpus: Gpus | None = None,
        path: Path | None = None,
        watts_per_core: float | None = None,
        max_samples: int = 360_000,
    ) -> None:
        if not hz > 0:
            raise ValueError(f"sampler: hz must be > 0, got {hz}")
        self.period = 1.0 / hz
        self.tree = ProcessTree()
        self.gpus = gpus if gpus is not None else getattr(meter, "gpus", None) or open_gpus()
        self.meter = meter or select_meter(watts_per_core=watts_per_core, gpus=self.gpus, tree=self.tree)
        self.path = path
        self.max_samples = max_samples
        self.samples: list[Sample] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._file: IO[str] | None = None
        self._cores = psutil.cpu_count() or 1
        self._prev: tuple[float, float, float] | None = None  # (monotonic, cpu_s, energy_j)
        self._energy0 = 0.0
        self._slow_every = max(1, round(hz))  # memory and file flush: about once a second
        self._n = 0
        self._vm = psutil.virtual_memory()

    @property
    def latest(self) -> Sample | None:
        with self._lock:
            return self.samples[-1] if self.samples else None

    def sample(self) -> Sample:
        """Take one sample now (the thread calls this; callers may too, e.g. at a window's edges)."""
        mono, now = time.monotonic(), time.time()
        slow = self._n % self._slow_every == 0
        self._n += 1
        cpu_s, rss = self.tree.read(from_sampler=True, memory=slow)
        energy = self.meter.read().joules
        if slow:
            self._vm = psutil.virtual_memory()
        vm = self._vm
        if self._prev is None:
            self._energy0 = energy
            cpu_util = power = 0.0
        else:
            dt = max(mono - self._prev[0], 1e-9)
            cpu_util = min(1.0, max(0.0, (cpu_s - self._prev[1]) / (dt * self._cores)))
            power = max(0.0, (energy - self._prev[2]) / dt)
        self._prev = (mono, cpu_s, energy)
        gpu = self.gpus.snapshot() if self.gpus is not None else None
        s = Sample(
            t=now,
            memory_utilisation=(gpu.memory_used_bytes / gpu.memory_total_bytes) if gpu else rss / vm.total,
            utilisation=gpu.utilisation if gpu else cpu_util,
            power_w=power,
            energy_j=energy - self._energy0,
            energy_source=self.meter.source,
            rss_bytes=rss,
            system_memory_used_bytes=int(vm.used),
            system_memory_total_bytes=int(vm.total),
            cpu_utilisation=cpu_util,
            gpu_memory_used_bytes=gpu.memory_used_bytes if gpu else 0,
            gpu_memory_total_bytes=gpu.memory_total_bytes if gpu else 0,
            gpu_utilisation=gpu.utilisation if gpu else 0.0,
        )
        with self._lock:
            self.samples.append(s)
            if len(self.samples) > self.max_samples:
                del self.samples[: len(self.samples) - self.max_samples]
            if self._file is not None:
                self._file.write(json.dumps(s.__dict__) + "\n")
                if slow:
                    self._file.flush()
        return s

    def _run(self) -> None:
        # NOTE: scheduled by deadline (t0 + k * period), not "sleep a period after each sample": a sample's
        # own time and a late wake-up no longer stretch every period. A wake-up needs the GIL, so next to a
        # thread that runs Python without pause (the switch interval is 5 ms; on a loaded machine the OS
        # adds its own delay) a wake-up can be tens of ms late; the next wait is then shorter. Slots missed
        # in a longer stall are skipped, never made up in a burst (samples are deltas over real time).
        next_at = time.monotonic() + self.period
        while not self._stop.wait(max(0.0, next_at - time.monotonic())):
            try:
                self.sample()
            except Exception:  # a sampler must never take the server down
                log.exception("resource sample failed")
            now = time.monotonic()
            next_at += self.period
            if next_at <= now:
                next_at += (now - next_at) // self.period * self.period + self.period

    def start(self) -> ResourceSampler:
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._file = self.path.open("a", encoding="utf-8")
        self.sample()
        self._thread = threading.Thread(target=self._run, daemon=True, name="effllm-sampler")
        self.tree.sampler_owned = True
        self._thread.start()
        return self

    def stop(self) -> None:
        """Take a last sample (so a window ends now), stop the thread, close the file and the meter."""
        if self._thread is None:
            return
        self._stop.set()
        self._thread.join(timeout=2.0)
        self._thread = None
        self.tree.sampler_owned = False
        self.sample()
        with self._lock:
            if self._file is not None:
                self._file.close()
                self._file = None
        self.meter.close()
        if self.gpus is not None:
            self.gpus.close()

    def samples_between(self, start: float | None = None, end: float | None = None) -> list[Sample]:
        """The kept samples with start <= t <= end (a copy, in time order)."""
        with self._lock:
            samples = list(self.samples)
        return [s for s in samples if (start is None or s.t >= start) and (end is None or s.t <= end)]

    def summary(self, start: float | None = None, end: float | None = None) -> WindowSummary:
        with self._lock:
            samples = list(self.samples)
        return summarize(samples, start, end)


class Measurement:
    """`with Measurement() as m:` samples for the block's duration; `m.summary` holds AMU, PCU, AEC (W),
    energy (J) and its source afterwards. `m.samples` are the raw samples."""

    def __init__(
        self,
        hz: float = 10.0,
        *,
        meter: EnergyMeter | None = None,
        path: Path | None = None,
        watts_per_core: float | None = None,
    ) -> None:
        self._sampler = ResourceSampler(hz, meter=meter, path=path, watts_per_core=watts_per_core)
        self._summary: WindowSummary | None = None

    def __enter__(self) -> Measurement:
        self._sampler.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._sampler.stop()
        self._summary = self._sampler.summary()

    @property
    def samples(self) -> list[Sample]:
        return list(self._sampler.samples)

    @property
    def summary(self) -> WindowSummary:
        """After the block; inside it, a summary up to now."""
        return self._summary if self._summary is not None else self._sampler.summary()

    def joules_per_token(self, output_tokens: int) -> float:
        return metrics.joules_per_token(self.summary.energy_j, output_tokens)


def read_samples(path: Path) -> list[Sample]:
    samples = []
    with path.open(encoding="utf-8") as f:
        for line in f:
            if line.strip():
                samples.append(Sample.from_dict(json.loads(line)))
    return samples
