"""CPU time and resident memory of this process and its children (vLLM's engine core is a child), and
one engine's own CPU time: a process tree of its own (vLLM's engine core), or its threads in this one
(`EngineThreads`, the hf engine's worker and its share of torch's thread pool).

Invariant: `cpu_seconds()` never decreases: a child that exits keeps the time it had at the last read.
The child list is refreshed at most every `refresh_s` because listing children scans all of /proc
(~4 ms with 100 processes); when a sampler thread owns the tree (`sampler_owned`), only it refreshes, so
reads from the event loop (energy attribution) never pay for the scan. Reads closer together than
`coalesce_s` return the previous figures. RSS is summed over the processes, so pages they share are
counted once per process.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time

import psutil


def child_pids() -> set[int]:
    """This process's direct children now (an engine diffs them around its start to find what it spawned)."""
    with contextlib.suppress(psutil.Error):
        return {p.pid for p in psutil.Process().children()}
    return set()


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


class EngineThreads:
    """CPU seconds of this process's threads, shared out among the engines that run in it (the hf engine's
    batching worker; one instance per process: `engine_threads()`).

    An owner claims its worker threads (`claim`, from inside the thread). The shared torch intra-op
    (OpenMP) pool is the threads an engine adopted as born while it loaded (`adopt_pool`), or, before any
    was adopted, every other thread but the main one (the event loop: gRPC aio, vLLM's output
    processing), helper threads (the resource sampler, gRPC's pollers) falling in with it. The pool
    computes for whichever worker called into torch: over each interval between two reads, the pool's
    CPU is divided among the owners in proportion to their claimed threads' CPU in that interval (their
    busy time), and goes to nobody when no owner was busy. So a thread another owner claimed never
    counts for an owner, and a neighbour spinning in another process never does either.
    Invariant: `seconds(owner)` never decreases; times count from the owner's first claim.
    """

    def __init__(self, pid: int | None = None) -> None:
        self._proc = psutil.Process(pid)
        self._main = self._proc.pid  # the main thread's id is the process id
        self._lock = threading.Lock()
        self._claims: dict[int, str] = {}  # thread id -> owner
        # torch's intra-op (OpenMP) threads when known (`adopt_pool`): then only they make the pool, and the
        # serving stack's threads (gRPC's, the sampler's, another engine's front-end) count for nobody
        self._pool: set[int] = set()
        self._totals: dict[str, float] = {}
        self._last: dict[int, float] = {}  # thread id -> CPU seconds at the last read

    def claim(self, owner: str, tid: int | None = None) -> None:
        """Thread `tid` (default: the calling thread) computes for `owner` from now on."""
        with self._lock:
            self._read()  # what it did before the claim is not the owner's
            self._claims[tid if tid is not None else threading.get_native_id()] = owner
            self._totals.setdefault(owner, 0.0)

    def thread_ids(self) -> set[int]:
        try:
            return {t.id for t in self._proc.threads()}
        except psutil.Error:
            return set()

    def adopt_pool(self, born: set[int]) -> None:
        """Threads `born` while an engine loaded and first ran torch (the caller diffs `thread_ids()`
        around it) are torch's intra-op pool; claimed threads and the main one are never pool."""
        with self._lock:
            self._read()
            self._pool |= {t for t in born if t not in self._claims and t != self._main}

    def seconds(self, owner: str) -> float:
        """`owner`'s CPU seconds so far: its claimed threads, plus its share of the pool."""
        with self._lock:
            self._read()
            return self._totals.get(owner, 0.0)

    def _read(self) -> None:
        try:
            threads = self._proc.threads()
        except psutil.Error:
            return
        busy: dict[str, float] = {}
        pool = 0.0
        now: dict[int, float] = {}
        for t in threads:
            cpu = now[t.id] = t.user_time + t.system_time
            delta = max(cpu - self._last.get(t.id, cpu), 0.0)  # a thread first seen counts from now
            owner = self._claims.get(t.id)
            if owner is not None:
                busy[owner] = busy.get(owner, 0.0) + delta
            elif t.id != self._main and (not self._pool or t.id in self._pool):
                pool += delta
        self._last = now
        total_busy = sum(busy.values())
        for owner, own in busy.items():
            self._totals[owner] += own + (pool * own / total_busy if total_busy > 0 else 0.0)


_threads: EngineThreads | None = None


def engine_threads() -> EngineThreads:
    """This process's EngineThreads (made at the first call; a forked child makes its own)."""
    global _threads
    if _threads is None or _threads._main != os.getpid():
        _threads = EngineThreads()
    return _threads
