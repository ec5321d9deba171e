"""EngineThreads: an engine's CPU is its claimed threads' plus its busy share of the unclaimed pool; another
owner's threads and the main thread never count for it."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from effllm.telemetry.proctree import EngineThreads

TICK = 0.02  # /proc thread times move in clock ticks (10 ms): allow two


def burn(seconds: float) -> None:
    end = time.thread_time() + seconds
    while time.thread_time() < end:
        pass


def test_an_owner_gets_its_threads_and_its_busy_share_of_the_pool() -> None:
    threads = EngineThreads()
    a, b, pool = (ThreadPoolExecutor(max_workers=1) for _ in range(3))
    try:
        a.submit(threads.claim, "a").result()
        b.submit(threads.claim, "b").result()
        pool.submit(lambda: None).result()  # the pool thread exists before the baseline read
        threads.seconds("a")
        # one interval: a burns 0.3 s, b 0.1 s, the unclaimed pool thread 0.2 s -> a gets 3/4 of the pool
        done = [a.submit(burn, 0.3), b.submit(burn, 0.1), pool.submit(burn, 0.2)]
        for f in done:
            f.result()
        got_a, got_b = threads.seconds("a"), threads.seconds("b")
        assert got_a == pytest.approx(0.3 + 0.15, abs=2 * TICK)
        assert got_b == pytest.approx(0.1 + 0.05, abs=2 * TICK)
        # nobody busy: the pool's CPU goes to no one
        pool.submit(burn, 0.2).result()
        assert threads.seconds("a") == pytest.approx(got_a, abs=TICK)
        # the main thread (event loop, gRPC) is nobody's
        burn(0.2)
        assert threads.seconds("b") == pytest.approx(got_b, abs=TICK)
    finally:
        for ex in (a, b, pool):
            ex.shutdown()


def test_a_claimed_spinning_neighbour_never_counts_for_another_owner() -> None:
    threads = EngineThreads()
    mine, theirs = ThreadPoolExecutor(max_workers=1), ThreadPoolExecutor(max_workers=1)
    stop = threading.Event()
    try:
        mine.submit(threads.claim, "mine").result()
        theirs.submit(threads.claim, "theirs").result()
        theirs.submit(lambda: [burn(0.001) for _ in iter(lambda: stop.is_set(), True)])
        before = threads.seconds("mine")
        mine.submit(burn, 0.2).result()
        assert threads.seconds("mine") - before == pytest.approx(0.2, abs=TICK)
    finally:
        stop.set()
        mine.shutdown()
        theirs.shutdown()
