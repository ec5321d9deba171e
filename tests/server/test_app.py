"""The server's lifecycle in-process: a real grpc.aio server on loopback around the scripted FakeEngine.

Health follows the load; a full queue refuses with RESOURCE_EXHAUSTED; a cancelled or failed request gives its
slot back; SIGTERM drains without losing a running or queued request and exits 0; an engine that dies turns
health NOT_SERVING and the server exits with ENGINE_DIED_EXIT. Seconds, no model.
"""

from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from effllm.api.v1 import generation_pb2 as pb
from effllm.api.v1 import generation_pb2_grpc as pb_grpc
from effllm.client import build_request
from effllm.server.app import ENGINE_DIED_EXIT, EffllmServer, ServerConfig, run

from .fakeengine import FakeEngine

SERVING, NOT_SERVING = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING


@dataclass
class Live:
    server: EffllmServer
    engine: FakeEngine
    stub: pb_grpc.GenerationServiceStub
    health: health_pb2_grpc.HealthStub
    exit: asyncio.Task[int]

    async def health_status(self) -> int:
        return (await self.health.Check(health_pb2.HealthCheckRequest(service=""), timeout=5)).status  # type: ignore[no-any-return]

    async def refusal(self, prompt: str = "hi", **kw: Any) -> grpc.aio.AioRpcError:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await self.stub.Generate(build_request(prompt, max_new_tokens=4, **kw), timeout=5)
        return err.value


async def until(predicate: Callable[[], object], timeout: float = 5.0) -> None:
    async with asyncio.timeout(timeout):
        while not predicate():
            await asyncio.sleep(0.005)


@asynccontextmanager
async def serving(engine: FakeEngine | None = None, **config: Any) -> AsyncIterator[Live]:
    engine = engine or FakeEngine()
    server = EffllmServer(engine, ServerConfig(port=0, grace_s=5.0, **config))  # type: ignore[arg-type]
    server.watch_interval_s = 0.02
    exit_code = asyncio.create_task(run(server))
    await until(lambda: server.port or exit_code.done())
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{server.port}")
    try:
        stub, health = pb_grpc.GenerationServiceStub(channel), health_pb2_grpc.HealthStub(channel)
        yield Live(server, engine, stub, health, exit_code)
    finally:
        await channel.close()
        if not exit_code.done():
            engine.release()
            await server.drain(grace_s=0.0)
        await asyncio.wait_for(exit_code, 10)


async def first_message(call: Any) -> pb.GenerateStreamResponse:
    return await asyncio.wait_for(call.read(), 5)  # type: ignore[no-any-return]


async def the_rest(call: Any) -> list[pb.GenerateStreamResponse]:
    """The stream's remaining messages (read(), since read and iteration must not mix on one call)."""
    out = []
    while (message := await asyncio.wait_for(call.read(), 5)) is not grpc.aio.EOF:
        out.append(message)
    return out


async def test_health_follows_the_load_and_a_request_is_served() -> None:
    engine = FakeEngine()
    engine.loaded.clear()  # the model "loads" until the test says so
    async with serving(engine) as live:
        assert await live.health_status() == NOT_SERVING
        loading = await live.refusal()
        assert loading.code() == grpc.StatusCode.UNAVAILABLE and "loading" in (loading.details() or "")
        engine.loaded.set()
        await until(lambda: live.server.generation.ready)
        assert await live.health_status() == SERVING
        one = build_request("say hi", max_new_tokens=3, request_id="r1")
        reply = await live.stub.Generate(one, timeout=5)
        assert reply.request_id == "r1" and list(reply.token_ids) == [2, 2, 2]
        assert reply.finish_reason == pb.FINISH_REASON_LENGTH and reply.usage.input_tokens == 2
        assert reply.timings.total_s > 0


async def test_full_queue_refuses_and_a_long_prompt_never_takes_a_slot() -> None:
    async with serving(max_concurrency=1, queue_size=1) as live:
        held = live.stub.GenerateStream(build_request("x", max_new_tokens=4, request_id="hold-1"), timeout=10)
        await first_message(held)
        queued = asyncio.ensure_future(
            live.stub.Generate(build_request("y", max_new_tokens=4, request_id="hold-2"), timeout=10)
        )
        await until(lambda: live.server.runner.queued == 1)
        full = await live.refusal()
        assert full.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "queue_size 1" in (full.details() or "")
        # Slot and queue full, yet an over-long prompt is refused for what it is (checked before admission)
        long = await live.refusal("word " * 80)
        assert long.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert (long.details() or "").startswith("prompt:")
        live.engine.release()
        rest = await the_rest(held)
        assert rest[-1].final.finish_reason == pb.FINISH_REASON_LENGTH
        assert (await asyncio.wait_for(queued, 5)).finish_reason == pb.FINISH_REASON_LENGTH
        stats = await live.stub.GetStats(pb.GetStatsRequest(), timeout=5)
        assert (stats.running, stats.queued, stats.requests_rejected) == (0, 0, 1)


async def test_a_cancelled_stream_and_an_engine_fault_give_the_slot_back() -> None:
    async with serving(max_concurrency=1, queue_size=0) as live:
        call = live.stub.GenerateStream(build_request("x", max_new_tokens=4, request_id="hold-1"), timeout=10)
        await first_message(call)
        call.cancel()
        await until(lambda: live.server.runner.running == 0)
        await until(lambda: live.engine.closed_early == ["hold-1"])  # the engine stream was aborted
        fault = await live.refusal(request_id="fail-1")
        assert fault.code() == grpc.StatusCode.INTERNAL and "RuntimeError" in (fault.details() or "")
        assert live.server.runner.running == 0 and live.engine.closed_early == ["hold-1", "fail-1"]
        # One slot, no queue: a leaked slot would refuse this with RESOURCE_EXHAUSTED (or never schedule it).
        reply = await live.stub.Generate(build_request("after", max_new_tokens=2), timeout=5)
        assert reply.finish_reason == pb.FINISH_REASON_LENGTH
        assert live.server.runner._slots._value == 1


async def test_sigterm_drains_without_losing_running_or_queued_requests() -> None:
    async with serving(max_concurrency=1, queue_size=1) as live:
        held = live.stub.GenerateStream(build_request("x", max_new_tokens=4, request_id="hold-1"), timeout=10)
        await first_message(held)
        queued = asyncio.ensure_future(
            live.stub.Generate(build_request("y", max_new_tokens=4, request_id="hold-2"), timeout=10)
        )
        await until(lambda: live.server.runner.queued == 1)
        # run() handles SIGTERM on the loop; without its handler the signal would end this test process.
        assert signal.getsignal(signal.SIGTERM) not in (signal.SIG_DFL, None)
        os.kill(os.getpid(), signal.SIGTERM)
        await until(lambda: live.server.generation.draining)
        assert await live.health_status() == NOT_SERVING
        late = await live.refusal()
        assert late.code() == grpc.StatusCode.UNAVAILABLE and "draining" in (late.details() or "")
        assert not live.exit.done()  # still serving the two it holds
        live.engine.release()
        rest = await the_rest(held)
        assert sum(len(m.token_ids) for m in rest) == 3
        assert rest[-1].final.finish_reason == pb.FINISH_REASON_LENGTH
        reply = await asyncio.wait_for(queued, 5)
        assert reply.finish_reason == pb.FINISH_REASON_LENGTH and len(reply.token_ids) == 4
        assert await asyncio.wait_for(live.exit, 10) == 0
        assert live.engine.shut_down and live.server.failure is None
    assert signal.getsignal(signal.SIGTERM) in (signal.SIG_DFL, signal.default_int_handler)  # handler removed


async def test_engine_death_turns_health_not_serving_and_exits_non_zero() -> None:
    async with serving() as live:
        await until(lambda: live.server.generation.ready)
        watch = live.health.Watch(health_pb2.HealthCheckRequest(service=""), timeout=10)
        assert (await watch.read()).status == SERVING
        live.engine.die()
        seen = await asyncio.wait_for(watch.read(), 5)
        assert seen.status == NOT_SERVING
        assert await asyncio.wait_for(live.exit, 10) == ENGINE_DIED_EXIT
        assert live.server.failure == "the engine died" and live.engine.shut_down


async def test_requests_cancelled_while_queued_are_counted() -> None:
    """20 streams, one running and 19 queued, all cancelled: GetStats counts 20 (main counted the running one
    only; the outside test saw 8 of 20)."""
    async with serving(max_concurrency=1, queue_size=32) as live:

        def stream(i: int) -> Any:
            return live.stub.GenerateStream(
                build_request("x", max_new_tokens=4, request_id=f"hold-{i}"), timeout=10
            )

        calls = [stream(0)]
        await first_message(calls[0])
        calls += [stream(i) for i in range(1, 20)]
        await until(lambda: live.server.runner.queued == 19)
        for call in calls:
            call.cancel()
        await until(lambda: live.server.runner.running + live.server.runner.queued == 0)
        stats = await live.stub.GetStats(pb.GetStatsRequest(), timeout=5)
        assert (stats.requests_cancelled, stats.requests_total) == (20, 20)


async def test_a_request_the_dying_engine_held_ends_unavailable_not_internal() -> None:
    """vLLM's EngineDeadError reached clients as INTERNAL, which they do not retry."""
    async with serving() as live:
        held = live.stub.GenerateStream(build_request("x", max_new_tokens=4, request_id="hold-1"), timeout=10)
        await first_message(held)
        live.engine.die()
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await the_rest(held)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "variant fp32:fake: its engine died (ScriptedEngineDead)" in (err.value.details() or "")
        assert await asyncio.wait_for(live.exit, 10) == ENGINE_DIED_EXIT  # one variant: as before


async def test_stream_interval_sends_the_first_token_alone_then_gathers_up_to_n() -> None:
    for interval, sizes in ((1, [1] * 10), (4, [1, 4, 4, 1])):
        async with serving(stream_interval=interval) as live:
            call = live.stub.GenerateStream(build_request("a b", max_new_tokens=10), timeout=5)
            messages = [await first_message(call), *await the_rest(call)]
        assert [len(m.token_ids) for m in messages] == sizes, interval
        assert sum(len(m.token_ids) for m in messages) == 10 and messages[-1].final.usage.output_tokens == 10
        assert "".join(m.text for m in messages) == " b" * 10  # no token or text lost in the gathering
        assert [m.HasField("final") for m in messages] == [False] * (len(sizes) - 1) + [True]
    with pytest.raises(ValueError, match="stream_interval 0"):
        ServerConfig(stream_interval=0)
