"""Admission in-process against the scripted FakeEngine: slots, the bounded queue, and what gives a slot back.

A leaked slot shows up twice: in the runner's counters and in the next request, which with one slot and no
queue is either refused or never scheduled (every wait here is bounded, so a leak fails, never hangs).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from effllm.server.engines.base import EffllmError, GenerationRequest, Sampling, TokenEvent
from effllm.server.runner import Runner

from .fakeengine import FakeEngine


def req(request_id: str, prompt: str = "say something", n: int = 4, **kw: object) -> GenerationRequest:
    return GenerationRequest(request_id, Sampling(max_new_tokens=n), prompt=prompt, **kw)  # type: ignore[arg-type]


async def collect(events: AsyncIterator[TokenEvent]) -> list[TokenEvent]:
    return [e async for e in events]


async def run_to_end(runner: Runner, request: GenerationRequest) -> list[TokenEvent]:
    return await asyncio.wait_for(collect(runner.run(request)), 5)


def assert_idle(runner: Runner) -> None:
    assert (runner.running, runner.queued) == (0, 0)
    assert runner._slots._value == runner.max_concurrency  # every slot is back in the semaphore


async def wait_for(predicate: object, timeout: float = 5.0) -> None:
    async with asyncio.timeout(timeout):
        while not predicate():  # type: ignore[operator]
            await asyncio.sleep(0.005)


async def test_a_request_runs_and_gets_timings() -> None:
    engine = FakeEngine()
    runner = Runner(engine, max_concurrency=1, queue_size=0)
    events = await run_to_end(runner, req("r1", n=3))
    assert [e.finish_reason for e in events] == [None, None, "length"]
    last = events[-1]
    assert last.usage is not None and last.usage.input_tokens == 2 and last.timings is not None
    assert last.timings.total_s >= last.timings.queue_s >= 0
    assert engine.calls == [("prepare", "r1"), ("generate", "r1")]
    assert_idle(runner)
    assert runner.counters.requests_total == 1 and runner.counters.output_tokens_total == 3


async def test_full_queue_refuses_with_resource_exhausted() -> None:
    engine = FakeEngine()
    runner = Runner(engine, max_concurrency=1, queue_size=1)
    running = asyncio.create_task(run_to_end(runner, req("hold-1")))
    await engine.until_inside("hold-1")
    queued = asyncio.create_task(run_to_end(runner, req("hold-2")))
    await wait_for(lambda: runner.queued == 1)
    with pytest.raises(EffllmError) as err:
        await run_to_end(runner, req("third"))
    assert err.value.code == "resource_exhausted" and "queue_size 1" in err.value.message
    assert runner.counters.requests_rejected == 1 and ("generate", "third") not in engine.calls
    engine.release()
    assert (await running)[-1].finish_reason == "length"
    assert (await queued)[-1].finish_reason == "length"
    assert_idle(runner)


async def test_cancel_while_queued_frees_the_queue_place_and_the_id() -> None:
    engine = FakeEngine()
    runner = Runner(engine, max_concurrency=1, queue_size=1)
    running = asyncio.create_task(run_to_end(runner, req("hold-1")))
    await engine.until_inside("hold-1")
    queued = asyncio.create_task(run_to_end(runner, req("hold-2")))
    await wait_for(lambda: runner.queued == 1)
    queued.cancel()
    with pytest.raises(asyncio.CancelledError):
        await queued
    assert (runner.running, runner.queued) == (1, 0) and ("generate", "hold-2") not in engine.calls
    again = asyncio.create_task(run_to_end(runner, req("hold-2")))  # the id is free, the place too
    await wait_for(lambda: runner.queued == 1)
    engine.release()
    await running
    assert (await again)[-1].finish_reason == "length"
    assert_idle(runner)


async def test_cancel_while_running_gives_the_slot_back() -> None:
    engine = FakeEngine()
    runner = Runner(engine, max_concurrency=1, queue_size=0)
    task = asyncio.create_task(run_to_end(runner, req("hold-1")))
    await engine.until_inside("hold-1")
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert engine.closed_early == ["hold-1"] and not engine.inside  # the engine stream was closed: aborted
    assert_idle(runner)
    assert runner.counters.requests_cancelled == 1
    assert (await run_to_end(runner, req("next")))[-1].finish_reason == "length"  # the one slot is free


async def test_a_consumer_that_stops_early_gives_the_slot_back() -> None:
    engine = FakeEngine()
    runner = Runner(engine, max_concurrency=1, queue_size=0)
    stream = runner.run(req("hold-1"))
    first = await asyncio.wait_for(anext(stream), 5)
    assert first.token_ids == (1,) and runner.running == 1
    await stream.aclose()  # type: ignore[attr-defined]
    assert engine.closed_early == ["hold-1"]
    assert_idle(runner)
    assert (await run_to_end(runner, req("next")))[-1].finish_reason == "length"


async def test_engine_error_gives_the_slot_back() -> None:
    engine = FakeEngine()
    runner = Runner(engine, max_concurrency=1, queue_size=0)
    with pytest.raises(RuntimeError, match="scripted engine fault"):
        await run_to_end(runner, req("fail-1"))
    assert_idle(runner)
    with pytest.raises(RuntimeError):  # a second fault: it got the one slot again, and gave it back again
        await run_to_end(runner, req("fail-2"))
    assert_idle(runner)
    assert (await run_to_end(runner, req("next")))[-1].finish_reason == "length"


async def test_duplicate_request_id_in_flight_is_refused() -> None:
    engine = FakeEngine()
    runner = Runner(engine, max_concurrency=2, queue_size=0)
    task = asyncio.create_task(run_to_end(runner, req("hold-1")))
    await engine.until_inside("hold-1")
    with pytest.raises(EffllmError) as err:
        await run_to_end(runner, req("hold-1"))
    assert err.value.code == "invalid_argument" and err.value.message.startswith("request_id:")
    engine.release()
    await task
    assert_idle(runner)


async def test_over_long_prompt_is_refused_before_it_takes_a_slot() -> None:
    """The one slot is busy and there is no queue: a prompt checked after admission would get
    RESOURCE_EXHAUSTED; checked before, it gets INVALID_ARGUMENT and the engine never sees it."""
    engine = FakeEngine(max_context=64)
    runner = Runner(engine, max_concurrency=1, queue_size=0)
    task = asyncio.create_task(run_to_end(runner, req("hold-1")))
    await engine.until_inside("hold-1")
    for request, says in (
        (req("long", prompt="word " * 61, n=4), "exceed the context of 64 tokens"),
        (req("capped", prompt="word " * 9, max_prompt_tokens=8), "max_prompt_tokens=8"),
    ):
        with pytest.raises(EffllmError) as err:
            await run_to_end(runner, request)
        assert err.value.code == "invalid_argument" and says in err.value.message
        assert err.value.message.startswith("prompt:")
    assert runner.counters.requests_rejected == 0 and (runner.running, runner.queued) == (1, 0)
    seen = [c for c in engine.calls if c[1] in ("long", "capped")]
    assert seen == [("prepare", "long"), ("prepare", "capped")]  # never generate
    engine.release()
    await task
    assert_idle(runner)
