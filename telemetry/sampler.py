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
Invariant: samples are appended in time order (t is Unix seconds); memory holds at most `max_samples`
(plus one block) of the latest, with their prefix integrals (`SampleIndex`), so a window's summary costs
O(log n) whatever the uptime; the JSONL file, when asked for, holds every sample taken, one JSON object a
line, flushed about once a second, rotated to `.1` past its byte cap (telemetry/jsonlines.py).

    with Measurement() as m:        # the tuner's API
        train_step()
    print(m.summary.amu, m.summary.pcu, m.summary.aec_w, m.summary.energy_j, m.summary.energy_source)
"""

from __future__ import annotations

import json
import logging
import threading
import time
from array import array
from bisect import bisect_left, bisect_right
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import psutil

from . import metrics
from .energy import EnergyMeter, Source, select_meter
from .jsonlines import RotatingLines, read_lines
from .nvml import Gpus, open_gpus
from .proctree import ProcessTree

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)  # slots: hours of samples are kept in memory
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


class SampleIndex:
    """Samples in time order with prefix integrals (trapezoid rule, as `summarize`): any window's AMU, PCU,
    AEC and energy in O(log n), its peak memory from per-block maxima. `summary` equals `summarize` over the
    same samples up to float rounding. Not thread-safe: its owner locks."""

    BLOCK = 1024  # samples per peak-memory block; the oldest are dropped a whole block at a time

    def __init__(self, samples: Sequence[Sample] = ()) -> None:
        self.samples: list[Sample] = []
        self._t = array("d")
        # ∫ memory_utilisation, ∫ memory_used_bytes, ∫ utilisation, ∫ power_w from the first kept sample
        self._area = tuple(array("d") for _ in range(4))
        self._block_peak: list[int] = []
        self._source_changes: list[int] = []  # absolute positions whose energy source differs from the last
        self._dropped = 0  # absolute position of samples[0]
        for x in samples:
            self.append(x)

    def __len__(self) -> int:
        return len(self.samples)

    def append(self, s: Sample) -> None:
        pos = self._dropped + len(self.samples)
        mu, mb, u, pw = self._area
        if self.samples:
            p = self.samples[-1]
            dt = s.t - p.t
            mu.append(mu[-1] + dt * (p.memory_utilisation + s.memory_utilisation) / 2)
            mb.append(mb[-1] + dt * (p.memory_used_bytes + s.memory_used_bytes) / 2)
            u.append(u[-1] + dt * (p.utilisation + s.utilisation) / 2)
            pw.append(pw[-1] + dt * (p.power_w + s.power_w) / 2)
            if s.energy_source != p.energy_source:
                self._source_changes.append(pos)
        else:
            for a in self._area:
                a.append(0.0)
        self.samples.append(s)
        self._t.append(s.t)
        if pos % self.BLOCK == 0:
            self._block_peak.append(s.memory_used_bytes)
        else:
            self._block_peak[-1] = max(self._block_peak[-1], s.memory_used_bytes)

    def drop_oldest_block(self) -> None:
        """Forget the oldest BLOCK samples (whole blocks keep the peak blocks aligned)."""
        n = self.BLOCK - self._dropped % self.BLOCK
        del self.samples[:n], self._t[:n], self._block_peak[:1]
        for a in self._area:
            del a[:n]
        self._dropped += n
        self._source_changes = [c for c in self._source_changes if c > self._dropped]

    def span(self, start: float | None, end: float | None) -> tuple[int, int]:
        """[i, j): the kept samples with start <= t <= end."""
        i = 0 if start is None else bisect_left(self._t, start)
        j = len(self._t) if end is None else bisect_right(self._t, end)
        return i, max(i, j)

    def between(self, start: float | None = None, end: float | None = None) -> list[Sample]:
        i, j = self.span(start, end)
        return self.samples[i:j]

    def summary(self, start: float | None = None, end: float | None = None) -> WindowSummary | None:
        """The window's summary; None when it holds no sample or mixes energy sources."""
        i, j = self.span(start, end)
        if j == i:
            return None
        first, last = self.samples[i], self.samples[j - 1]
        lo, hi = self._dropped + i, self._dropped + j - 1
        if any(lo < c <= hi for c in self._source_changes):
            return None
        t = last.t - first.t
        if t <= 0:  # one sample, or all at one instant: their plain mean (metrics.time_average does so)
            return summarize(self.samples[i:j])
        mu, mb, u, pw = ((a[j - 1] - a[i]) / t for a in self._area)
        return WindowSummary(
            start=first.t,
            end=last.t,
            samples=j - i,
            amu=mu,
            amu_bytes=mb,
            peak_memory_bytes=self._peak(lo, hi),
            pcu=u,
            aec_w=pw,
            energy_j=last.energy_j - first.energy_j,
            energy_source=first.energy_source,
            device="cuda" if first.gpu_memory_total_bytes else "cpu",
        )

    def _peak(self, lo: int, hi: int) -> int:
        """max memory_used_bytes over absolute positions lo..hi: whole blocks from their maxima."""
        b0, b1, base = lo // self.BLOCK, hi // self.BLOCK, self._dropped // self.BLOCK
        d = self._dropped
        if b0 == b1:
            return max(x.memory_used_bytes for x in self.samples[lo - d : hi - d + 1])
        edge_lo = max(x.memory_used_bytes for x in self.samples[lo - d : (b0 + 1) * self.BLOCK - d])
        edge_hi = max(x.memory_used_bytes for x in self.samples[b1 * self.BLOCK - d : hi - d + 1])
        inner = self._block_peak[b0 + 1 - base : b1 - base]
        return max(edge_lo, edge_hi, *inner)


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
        max_file_bytes: int = 0,
    ) -> None:
        if not hz > 0:
            raise ValueError(f"sampler: hz must be > 0, got {hz}")
        self.period = 1.0 / hz
        self.tree = ProcessTree()
        self.gpus = gpus if gpus is not None else getattr(meter, "gpus", None) or open_gpus()
        self.meter = meter or select_meter(watts_per_core=watts_per_core, gpus=self.gpus, tree=self.tree)
        self.path = path
        self.max_samples = max_samples
        self.max_file_bytes = max_file_bytes  # 0: no cap; else rotated to PATH.1 past it
        self.index = SampleIndex()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._file: RotatingLines | None = None
        self._cores = psutil.cpu_count() or 1
        self._prev: tuple[float, float, float] | None = None  # (monotonic, cpu_s, energy_j)
        self._energy0 = 0.0
        self._slow_every = max(1, round(hz))  # memory and file flush: about once a second
        self._n = 0
        self._vm = psutil.virtual_memory()

    @property
    def samples(self) -> list[Sample]:
        """The kept samples (a copy, in time order)."""
        with self._lock:
            return list(self.index.samples)

    @property
    def latest(self) -> Sample | None:
        with self._lock:
            return self.index.samples[-1] if self.index.samples else None

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
            self.index.append(s)
            if len(self.index) > self.max_samples + SampleIndex.BLOCK:
                self.index.drop_oldest_block()
            if self._file is not None:
                self._file.write(json.dumps(asdict(s)), flush=slow)
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
            self._file = RotatingLines(self.path, self.max_file_bytes)
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
            return self.index.between(start, end)

    def count_between(self, start: float | None = None, end: float | None = None) -> int:
        with self._lock:
            i, j = self.index.span(start, end)
        return j - i

    def window_summary(self, start: float | None = None, end: float | None = None) -> WindowSummary | None:
        """The window's summary in O(log n) (None: no sample in it, or mixed energy sources)."""
        with self._lock:
            return self.index.summary(start, end)

    def window(self, start: float | None, end: float | None) -> tuple[WindowSummary | None, list[Sample]]:
        """The window's summary and its samples, read together (a sample taken meanwhile is in both or
        in neither)."""
        with self._lock:
            return self.index.summary(start, end), self.index.between(start, end)

    def summary(self, start: float | None = None, end: float | None = None) -> WindowSummary:
        with self._lock:
            samples = self.index.between(start, end)
        return summarize(samples)


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
    """The samples in a JSONL file and, first, in its rotated `PATH.1` (when there is one)."""
    return [Sample.from_dict(json.loads(line)) for line in read_lines(path) if line.strip()]
