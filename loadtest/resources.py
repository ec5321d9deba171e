"""Watch a local server's process tree during a campaign: memory, CPU utilisation, estimated energy.

The load side's own view of the server, for when the server's telemetry (spans with attributed energy,
its sampler) is absent: a background thread samples the process and its children (vLLM's CPU engine runs
in a child process) every `interval_s` with psutil. Energy from CPU time is an estimate and is labelled
so (`estimated`, watts per core resolved as everywhere: `telemetry.energy.resolve_watts_per_core`); a RAPL
counter is used instead where readable (`measured-rapl`, whole package, so other load on the machine counts
too). The process-tree walk, the meters and their labels are telemetry's (one measurement library).
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field

import psutil

from ..telemetry.energy import CpuTimeEstimateMeter, RaplMeter, resolve_watts_per_core
from ..telemetry.proctree import ProcessTree


@dataclass
class Sample:
    t: float  # unix seconds
    rss_bytes: int
    cpu_s: float  # cumulative CPU seconds of the tree
    rapl_j: float | None


@dataclass
class ResourceWatch:
    pid: int
    interval_s: float = 0.2
    watts_per_core: float | None = None  # None: $EFFLLM_WATTS_PER_CORE, else the default
    samples: list[Sample] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None
    _tree: ProcessTree | None = None
    _rapl: RaplMeter | None = None

    def __post_init__(self) -> None:
        self.watts_per_core = resolve_watts_per_core(self.watts_per_core)
        try:
            self._rapl = RaplMeter()
        except OSError:
            self._rapl = None

    def sample(self) -> Sample | None:
        try:
            if self._tree is None:  # CPU seconds count from the first sample; children refreshed each 1 s
                self._tree = ProcessTree(self.pid, refresh_s=1.0, coalesce_s=0.0)
            cpu, rss = self._tree.read()
        except psutil.Error:
            return None
        rapl = self._rapl.read().joules if self._rapl is not None else None
        return Sample(time.time(), rss, cpu, rapl)

    def _run(self) -> None:
        while not self._stop.is_set():
            s = self.sample()
            if s is not None:
                self.samples.append(s)
            self._stop.wait(self.interval_s)

    def start(self) -> ResourceWatch:
        self._thread = threading.Thread(target=self._run, name="effllm-resource-watch", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> ResourceWatch:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        return self

    def summary(self, t0: float | None = None, t1: float | None = None) -> dict[str, float | str | None]:
        """Figures over [t0, t1] (unix s): AMU (mean RSS, GB), PCU (mean busy cores / cores), energy, AEC."""
        s = [x for x in self.samples if (t0 is None or x.t >= t0) and (t1 is None or x.t <= t1)]
        if len(s) < 2:
            return {"samples": len(s)}
        span = s[-1].t - s[0].t
        cpu_s = s[-1].cpu_s - s[0].cpu_s
        if s[0].rapl_j is not None and s[-1].rapl_j is not None and s[-1].rapl_j >= s[0].rapl_j:
            energy, source = s[-1].rapl_j - s[0].rapl_j, RaplMeter.source
        else:
            assert self.watts_per_core is not None  # resolved in __post_init__
            energy, source = cpu_s * self.watts_per_core, CpuTimeEstimateMeter.source
        return {
            "samples": len(s),
            "window_s": span,
            "amu_gb": sum(x.rss_bytes for x in s) / len(s) / 1e9,
            "peak_rss_gb": max(x.rss_bytes for x in s) / 1e9,
            "pcu": cpu_s / span / (psutil.cpu_count() or 1),
            "cpu_s": cpu_s,
            "energy_j": energy,
            "aec_w": energy / span,
            "energy_source": source,
        }
