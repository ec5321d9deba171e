"""GetTelemetry on a real grpc.aio server around the scripted FakeEngine, with the server's real request
observer and a resource sampler whose history the tests fill by hand (hours of samples in a second).

Bounded work off the event loop (minted adapter names and a long history stall no stream), no per-name
record for refused names, no tenant data to a non-admin, the reply caps and the window checks. No model.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest

from effllm.api.v1 import generation_pb2 as pb
from effllm.api.v1 import generation_pb2_grpc as pb_grpc
from effllm.client import build_request
from effllm.common.auth import AuthConfig
from effllm.server.app import EffllmServer, ServerConfig, run
from effllm.server.telemetry_rpc import MAX_SAMPLES, telemetry_reply
from effllm.telemetry.genai import Instruments, RequestObserver, ServedModel
from effllm.telemetry.sampler import ResourceSampler, Sample
from effllm.telemetry.serving import ServerTelemetry
from effllm.telemetry.tracing import TelemetryConfig, make_providers

from .fakeengine import FakeEngine
from .test_app import until

ADMIN, GENERATE = "admin-token-0123456789", "generate-token-0123456789"


def history(sampler: ResourceSampler, n: int, hz: float = 10.0) -> None:
    """`n` samples at `hz` ending now, straight into the sampler's kept history."""
    t0 = time.time() - n / hz
    for i in range(n):
        sampler.index.append(
            Sample(
                t=t0 + i / hz,
                memory_utilisation=0.25 + 0.01 * (i % 7),
                utilisation=0.5,
                power_w=30.0 + i % 5,
                energy_j=3.0 * i,
                energy_source="estimated",
                rss_bytes=(100 << 20) + (i % 11),
                system_memory_used_bytes=1 << 30,
                system_memory_total_bytes=4 << 30,
                cpu_utilisation=0.5,
            )
        )


def hand_telemetry(run_dir: Path) -> ServerTelemetry:
    """The server's own telemetry pieces (observer, sampler), not installed globally, sampler not started."""
    config = TelemetryConfig(exporter="none", sample_hz=0, run_dir=run_dir)
    providers = make_providers(config, run_dir)
    observer = RequestObserver(
        ServedModel("fake", "fp32", "fake", 1000),
        providers.tracer_provider.get_tracer("test"),
        Instruments(providers.meter_provider.get_meter("test")),
    )
    return ServerTelemetry(config, run_dir, providers, observer, ResourceSampler(10.0))


@dataclass
class Live:
    server: EffllmServer
    engine: FakeEngine
    stub: pb_grpc.GenerationServiceStub
    tel: ServerTelemetry

    async def telemetry(self, token: str | None = None, **kw: Any) -> pb.Telemetry:
        metadata = (("authorization", f"Bearer {token}"),) if token else None
        return await self.stub.GetTelemetry(pb.GetTelemetryRequest(**kw), timeout=30, metadata=metadata)  # type: ignore[no-any-return]


@asynccontextmanager
async def serving(tmp_path: Path, **config: Any) -> AsyncIterator[Live]:
    engine, tel = FakeEngine(), hand_telemetry(tmp_path)
    server = EffllmServer(engine, ServerConfig(port=0, grace_s=5.0, **config), telemetry=tel)
    exit_code = asyncio.create_task(run(server))
    await until(lambda: server.generation.ready or exit_code.done())
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{server.port}")
    try:
        yield Live(server, engine, pb_grpc.GenerationServiceStub(channel), tel)
    finally:
        await channel.close()
        if not exit_code.done():
            engine.release()
            await server.drain(grace_s=0.0)
        await asyncio.wait_for(exit_code, 10)


async def minted(live: Live, n: int, batch: int = 200) -> None:
    """`n` requests for adapters that do not exist, each under its own client-chosen name: NOT_FOUND."""

    async def one(i: int) -> None:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await live.stub.Generate(build_request("hi", max_new_tokens=2, adapter=f"minted-{i}"), timeout=30)
        assert err.value.code() == grpc.StatusCode.NOT_FOUND

    for lo in range(0, n, batch):
        await asyncio.gather(*(one(i) for i in range(lo, min(n, lo + batch))))


async def test_minted_names_and_hours_of_samples_neither_freeze_the_server_nor_make_groups(
    tmp_path: Path,
) -> None:
    """The outside test's repro: 4,000 refused requests under minted names and a long sample history. On
    main each call rescanned every sample per name on the event loop (13 s with 1 h of samples, and every
    stream stalled as long)."""
    async with serving(tmp_path) as live:
        history(live.tel.sampler, 3 * 3600 * 10)  # type: ignore[arg-type]  # 3 h at 10 Hz
        await minted(live, 4000)
        live.engine.token_interval_s = 0.02
        stream = live.stub.GenerateStream(
            build_request("x", max_new_tokens=60, request_id="slow-1"), timeout=60
        )
        arrivals: list[float] = []

        async def read() -> None:
            while (message := await stream.read()) is not grpc.aio.EOF:
                arrivals.append(time.perf_counter())
                if message.HasField("final"):
                    return

        reader = asyncio.create_task(read())
        await until(lambda: len(arrivals) >= 3)
        took = []
        for _ in range(3):
            t0 = time.perf_counter()
            tel = await live.telemetry()
            took.append(time.perf_counter() - t0)
        await asyncio.wait_for(reader, 30)
        gaps = [b - a for a, b in itertools.pairwise(arrivals)]
        assert len(arrivals) == 60 and max(gaps) < 0.5, (max(gaps), took)
        assert max(took) < 2.0, took  # the call itself, gRPC included, on a loaded test machine
        # one group for every refused name, never one per name (and "(base)" once the stream has finished)
        groups = {g.adapter: (g.requests, g.errors) for g in tel.groups}
        assert groups["(invalid)"] == (4000, 4000) and set(groups) <= {"(invalid)", "(base)", "ALL"}
        assert tel.resources.samples >= 3 * 36000 and tel.resources.energy_source == "estimated"
        assert sum(r.adapter == "(invalid)" for r in tel.requests) == 4000
        # the summarising itself, without gRPC (the issue asks < 100 ms: ~65 ms here on an idle core; the
        # best of three, with slack, since this machine's other tenants come and go)
        work = []
        for _ in range(3):
            t0 = time.perf_counter()
            telemetry_reply(live.tel, pb.GetTelemetryRequest(), "fake", "fp32", "fake", now=time.time())
            work.append(time.perf_counter() - t0)
        print(f"GetTelemetry calls {[round(t, 3) for t in took]} s; summarising {min(work):.3f} s")
        assert min(work) < 0.5, work


async def test_a_non_admin_gets_the_aggregate_only(tmp_path: Path) -> None:
    auth = AuthConfig((("admin", ADMIN), ("generate", GENERATE)))
    async with serving(tmp_path, auth=auth) as live:
        await live.stub.Generate(build_request("a b", max_new_tokens=2, request_id="tenant-req-1"), timeout=5)
        await minted(live, 3)
        for token in (None, GENERATE, "not-a-valid-token-at-all"):
            tel = await live.telemetry(token)
            wire = tel.SerializeToString()
            assert not tel.requests and b"tenant-req-1" not in wire and b"invalid" not in wire, token
            assert [(g.adapter, g.requests, g.errors, g.output_tokens) for g in tel.groups] == [
                ("ALL", 4, 3, 2)
            ]
        tel = await live.telemetry(ADMIN)
        assert {r.request_id for r in tel.requests} >= {"tenant-req-1"} and len(tel.requests) == 4
        assert [g.adapter for g in tel.groups] == ["(base)", "(invalid)", "ALL"]


async def test_windows_are_checked_and_replies_capped(tmp_path: Path) -> None:
    async with serving(tmp_path, max_message_bytes=4096) as live:
        now = time.time()
        for kw, field in (
            ({"start_unix_s": now, "end_unix_s": now - 60}, "start_unix_s:"),
            ({"start_unix_s": now + 3600}, "start_unix_s:"),  # after now, the open end: answered on main
            ({"end_unix_s": float("inf")}, "start_unix_s, end_unix_s:"),
        ):
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await live.telemetry(**kw)
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, kw
            assert (err.value.details() or "").startswith(field), err.value.details()
        history(live.tel.sampler, MAX_SAMPLES + 10)  # type: ignore[arg-type]
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await live.telemetry(include_samples=True)
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "include_samples" in (err.value.details() or "") and "start_unix_s" in (
            err.value.details() or ""
        )
        assert (await live.telemetry()).resources.samples == MAX_SAMPLES + 10  # the summary alone is fine
        last = live.tel.sampler.latest.t  # type: ignore[union-attr]
        narrow = await live.telemetry(include_samples=True, start_unix_s=last - 2, end_unix_s=last)
        assert len(narrow.samples) == narrow.resources.samples in (20, 21)  # 2 s at 10 Hz (float ends)
        await minted(live, 100)  # ~100 request figures: more than a 4 KiB message holds
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await live.telemetry()
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "message cap" in (err.value.details() or ""), err.value.details()
        assert len((await live.telemetry(start_unix_s=time.time() - 1e-3)).requests) < 100
