"""CPU time and resident memory of this process and its children (vLLM's engine core is a child).

Invariant: `cpu_seconds()` never decreases: a child that exits keeps the time it had at the last read.
The child list is refreshed at most every `refresh_s` because listing children scans all of /proc
(~4 ms with 100 processes); when a sampler thread owns the tree (`sampler_owned`), only it refreshes, so
reads from the event loop (energy attribution) never pay for the scan. Reads closer together than
`coalesce_s` return the previous figures. RSS is summed over the processes, so pages they share are
counted once per process.
"""

from __future__ import annotations

import contextlib
import threading
import time

import psutil


class ProcessTree:
    def __init__(self, pid: int | None = None, refresh_s: float = 5.0, coalesce_s: float = 0.005) -> None:
        self._root = psutil.Process(pid)
        self._refresh_s = refresh_s
        self._coalesce_s = coalesce_s
        self._read_at = -1e18
        self.sampler_owned = False
        self._lock = threading.Lock()
        self._procs: dict[int, psutil.Process] = {}
        self._last_cpu: dict[int, float] = {}
        self._rss: dict[int, int] = {}
        self._listed_at = -1e18
        self._cpu_s = 0.0
        self._baseline = True
        self._update(True, True)  # baseline: CPU time counts from now
        self._baseline = False

    def _update(self, may_list: bool, memory: bool) -> None:
        now = time.monotonic()
        if now - self._read_at < self._coalesce_s:
            return
        self._read_at = now
        if may_list and now - self._listed_at >= self._refresh_s:
            procs = [self._root]
            with contextlib.suppress(psutil.Error):
                procs += self._root.children(recursive=True)
            self._procs = {p.pid: self._procs.get(p.pid, p) for p in procs}
            self._listed_at = now
        for pid, proc in list(self._procs.items()):
            try:
                if memory:
                    with proc.oneshot():
                        t = proc.cpu_times()
                        self._rss[pid] = int(proc.memory_info().rss)
                else:  # one /proc read instead of two: RSS moves slowly, CPU time is what we integrate
                    t = proc.cpu_times()
            except psutil.Error:  # gone: its time up to the last read is already counted
                self._procs.pop(pid, None)
                self._last_cpu.pop(pid, None)
                self._rss.pop(pid, None)
                continue
            cpu = t.user + t.system
            # A process first seen after the baseline started after it: all its CPU time is ours.
            prev = self._last_cpu.get(pid, None if self._baseline else 0.0)
            if prev is not None and cpu > prev:
                self._cpu_s += cpu - prev
            self._last_cpu[pid] = cpu

    def read(self, from_sampler: bool = False, memory: bool = True) -> tuple[float, int]:
        """(CPU seconds since this object was made, RSS bytes), in one pass over /proc; with
        memory=False the RSS is the last one read."""
        with self._lock:
            self._update(from_sampler or not self.sampler_owned, memory)
            return self._cpu_s, sum(self._rss.values())

    def cpu_seconds(self) -> float:
        return self.read(memory=False)[0]
