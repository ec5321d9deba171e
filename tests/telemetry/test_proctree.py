"""EngineThreads: an engine's CPU is its claimed threads' plus its busy share of the unclaimed pool; another
owner's threads and the main thread never count for it."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import psutil
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


def test_an_adopted_pool_leaves_the_serving_stacks_threads_out() -> None:
    """Once an engine adopted the threads torch started while it loaded, only they are the pool: a
    busy thread of the serving stack (gRPC, a front-end) next to a busy worker counts for nobody."""
    threads = EngineThreads()
    stop = threading.Event()
    claimed = threading.Event()

    def burn(claim: str | None = None) -> None:
        if claim:
            threads.claim(claim)
            claimed.set()
        while not stop.is_set():
            sum(i * i for i in range(1000))

    before = threads.thread_ids()
    pool = threading.Thread(target=burn, daemon=True)  # stands for torch's intra-op thread
    pool.start()
    born = threads.thread_ids() - before
    assert pool.native_id in born
    # only the pool: a thread another test left behind may also be born meanwhile in a full run
    threads.adopt_pool({pool.native_id})
    stack = threading.Thread(target=burn, daemon=True)  # a serving-stack thread born later: not pool
    worker = threading.Thread(target=burn, args=("hf",), daemon=True)
    stack.start()
    worker.start()
    claimed.wait(5)
    start = threads.seconds("hf")
    cpu0 = {t.id: t.user_time + t.system_time for t in psutil.Process().threads()}
    time.sleep(1.5)
    got = threads.seconds("hf") - start
    cpu1 = {t.id: t.user_time + t.system_time for t in psutil.Process().threads()}
    stop.set()
    for t in (pool, stack, worker):
        t.join(5)
    spent = {tid: cpu1[tid] - cpu0.get(tid, 0.0) for tid in cpu1}
    pool_and_worker = spent.get(pool.native_id or -1, 0.0) + spent.get(worker.native_id or -1, 0.0)
    everything = sum(v for tid, v in spent.items() if tid != threads._main)
    stack_cpu = spent.get(stack.native_id or -1, 0.0)
    assert stack_cpu > 0.2  # the stack thread really burnt CPU beside the worker
    # the engine's figure is its worker and the pool, never the stack thread (tolerance: read moments)
    assert 0.6 * pool_and_worker <= got <= 1.25 * pool_and_worker + 0.05
    assert got < everything - 0.5 * stack_cpu
