"""Watch a local server's process tree during a campaign: memory, CPU utilisation, estimated energy.

The load side's own view of the server, for when the server's telemetry (spans with attributed energy,
its sampler) is absent: a background thread samples the process and its children (vLLM's CPU engine runs
in a child process) every `interval_s` with psutil. Energy from CPU time is an estimate and is labelled
so: `estimated(cpu-time x W/core)`; a RAPL counter is used instead where readable (`measured(rapl)`,
whole package, so other load on the machine counts too).
"""

from __future__ import annotations

import contextlib
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import psutil

# NOTE: an assumption, not a measurement: a busy modern server core draws roughly 10 W at the package.
WATTS_PER_BUSY_CORE = 10.0
_RAPL = Path("/sys/class/powercap/intel-rapl:0/energy_uj")


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
    samples: list[Sample] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def _tree(self) -> list[psutil.Process]:
        root = psutil.Process(self.pid)
        return [root, *root.children(recursive=True)]

    def sample(self) -> Sample | None:
        rss, cpu = 0, 0.0
        try:
            procs = self._tree()
        except psutil.Error:
            return None
        for p in procs:
            try:
                rss += p.memory_info().rss
                t = p.cpu_times()
                cpu += t.user + t.system
            except psutil.Error:
                continue  # a child that just exited
        rapl = None
        with contextlib.suppress(OSError, ValueError):
            rapl = int(_RAPL.read_text()) / 1e6
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
            energy, source = s[-1].rapl_j - s[0].rapl_j, "measured(rapl)"
        else:
            energy, source = (
                cpu_s * WATTS_PER_BUSY_CORE,
                f"estimated(cpu-time x {WATTS_PER_BUSY_CORE:g} W/core)",
            )
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
