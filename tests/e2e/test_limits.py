"""Limits and overload against the real hardened server (2 batch slots, queue of 2, 64 prompt tokens,
256 new tokens, 1 MiB messages, 30 s per request): each limit refuses at once and names itself; a burst
is partly refused fast while every accepted request finishes; memory does not grow with bursts."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import psutil
import pytest

from effllm.client import EffllmClient

from .conftest import HARDENED_LIMITS, Hardened

COUNTING = "Count from 1 to 500, separated by commas: 1, 2, 3, 4,"


def _client(hardened: Hardened, timeout: float = 60.0) -> EffllmClient:
    return EffllmClient(hardened.server.target, security=hardened.security("generate"), timeout=timeout)


def _refusal(fn: object) -> tuple[grpc.StatusCode, str, float]:
    t0 = time.perf_counter()
    with pytest.raises(grpc.RpcError) as info:
        fn()  # type: ignore[operator]
    return info.value.code(), info.value.details() or "", time.perf_counter() - t0


def test_limits_refuse_at_once_naming_the_limit(hardened: Hardened) -> None:
    with _client(hardened) as c:
        cases = {
            "limit of 256 (max_new_tokens)": lambda: c.generate("hi", max_new_tokens=257),
            "max_prompt_tokens=64": lambda: c.generate("word " * 200, max_new_tokens=2),
            "max_prompt_chars=200000": lambda: c.generate("a" * 300_000, max_new_tokens=2),
            "max_stop_chars=256": lambda: c.generate("hi", max_new_tokens=2, stop=["s" * 300]),
        }
        for limit, call in cases.items():
            code, details, seconds = _refusal(call)
            assert code == grpc.StatusCode.INVALID_ARGUMENT, (limit, details)
            assert limit in details, details
            assert seconds < 2.0, (limit, seconds)
        # The rendered prompt is checked before admission: an over-long one never held a slot, so the
        # runner (which counts every request that got one) never saw it.
        served = c.stats().requests_total
        code, details, _ = _refusal(lambda: c.generate(messages=[("user", "word " * 200)], max_new_tokens=2))
        assert code == grpc.StatusCode.INVALID_ARGUMENT and "max_prompt_tokens=64" in details, details
        assert c.stats().requests_total == served
        # The message size limit is gRPC's own (raised from 4 MiB by --max-message-mib): RESOURCE_EXHAUSTED.
        code, details, _ = _refusal(lambda: c.generate("a" * (2 << 20), max_new_tokens=2))
        assert code == grpc.StatusCode.RESOURCE_EXHAUSTED, details
        assert str(1 << 20) in details or "larger than max" in details, details
        assert c.generate("Say hi", max_new_tokens=2).usage.output_tokens >= 1  # still serving


def test_request_time_cap_ends_a_long_request(hardened: Hardened) -> None:
    """A `slow-*` request (it stalls in the engine, failpoint) cannot finish inside the cap: the server ends
    it at the cap with DEADLINE_EXCEEDED naming the limit, although the client allowed far longer."""
    cap = HARDENED_LIMITS["max_request_s"]
    with _client(hardened, timeout=300) as c:
        t0 = time.perf_counter()
        with pytest.raises(grpc.RpcError) as info:
            c.generate(COUNTING, max_new_tokens=128, temperature=0, request_id="slow-cap-1")
        elapsed = time.perf_counter() - t0
        assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED, info.value.details()
        assert f"max_request_s={cap:g}" in (info.value.details() or "")
        assert cap - 0.5 < elapsed < cap + 10.0, elapsed
        stats = c.stats()
        assert stats.running == 0 and stats.engine_running == 0


def _tree_rss(pid: int) -> int:
    proc = psutil.Process(pid)
    return sum(p.memory_info().rss for p in [proc, *proc.children(recursive=True)])


def test_burst_is_refused_fast_and_accepted_ones_finish(hardened: Hardened) -> None:
    burst = 40
    slots = HARDENED_LIMITS["max_concurrency"] + HARDENED_LIMITS["queue_size"]
    with _client(hardened) as c:
        before = c.stats()
        rss = [_tree_rss(hardened.server.proc.pid)]

        def one(i: int) -> tuple[str, float, int]:
            t0 = time.perf_counter()
            try:
                reply = c.generate(f"Story {i}: once upon a time", max_new_tokens=1, temperature=0)
                return "OK", time.perf_counter() - t0, reply.finish_reason
            except grpc.RpcError as err:
                assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, err.details()
                assert "queue_size 2" in (err.details() or "")
                return "RESOURCE_EXHAUSTED", time.perf_counter() - t0, 0

        outcomes = []
        with ThreadPoolExecutor(burst) as pool:
            for _ in range(3):
                outcomes += list(pool.map(one, range(burst)))
                rss.append(_tree_rss(hardened.server.proc.pid))
        after = c.stats()
    ok = [o for o in outcomes if o[0] == "OK"]
    refused = [o for o in outcomes if o[0] == "RESOURCE_EXHAUSTED"]
    assert len(ok) >= slots and refused, (len(ok), len(refused))
    assert all(finish != 0 for _, _, finish in ok)  # every accepted request finished with a reason
    refused_s = sorted(s for _, s, _ in refused)
    assert refused_s[len(refused_s) // 2] < 1.0, refused_s  # the median refusal is fast
    assert after.requests_rejected - before.requests_rejected == len(refused)
    assert after.running == 0 and after.queued == 0
    # Bounded memory: three bursts cost no more than 64 MiB over the first.
    assert max(rss[1:]) - rss[1] < 64 << 20, [r >> 20 for r in rss]
