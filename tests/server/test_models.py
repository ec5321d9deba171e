"""Several base models in one server (server/models.py), in-process: a real grpc.aio server around two
scripted FakeEngines, each its own model with its own variants, adapters and admission. Seconds, no model
weights (the wrong-base test reads the session's real adapter root, tests/adapterroot.py)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, replace
from typing import Any

import grpc
import pytest

from effllm.api.v1 import adapters_pb2 as apb
from effllm.api.v1 import adapters_pb2_grpc as apb_grpc
from effllm.api.v1 import generation_pb2 as pb
from effllm.api.v1 import generation_pb2_grpc as pb_grpc
from effllm.client import build_request
from effllm.server.adapters.registry import AdapterRegistry, RegistryConfig
from effllm.server.app import EffllmServer, ServerConfig, run
from effllm.server.models import HostedModel

from .fakeengine import FakeEngine
from .test_app import first_message, the_rest, until


@dataclass
class Two:
    server: EffllmServer
    a: FakeEngine
    b: FakeEngine
    stub: pb_grpc.GenerationServiceStub
    adapters: apb_grpc.AdapterServiceStub

    async def refusal(self, call: Any) -> grpc.aio.AioRpcError:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await call
        return err.value


@asynccontextmanager
async def two_models(
    a: FakeEngine | None = None,
    b: FakeEngine | None = None,
    root: Any = None,
    **config: Any,
) -> AsyncIterator[Two]:
    """Model "a" (the default) and model "b" on one server; with `root` (an AdapterRoot) each gets a
    registry over that one adapter root."""
    a, b = a or FakeEngine(model="a", fingerprint="fp-a"), b or FakeEngine(model="b", fingerprint="fp-b")
    reg_a = reg_b = None
    if root is not None:
        rc = RegistryConfig(root=root.root)
        reg_a, reg_b = AdapterRegistry(a, root.base, rc), AdapterRegistry(b, root.base, rc)  # type: ignore[arg-type]
    cfg = ServerConfig(port=0, grace_s=5.0, **config)
    server = EffllmServer(a, cfg, reg_a, more=[HostedModel((b,), "b", reg_b)])  # type: ignore[arg-type]
    exit_code = asyncio.create_task(run(server))
    await until(lambda: server.generation.ready or exit_code.done())
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{server.port}")
    try:
        yield Two(server, a, b, pb_grpc.GenerationServiceStub(channel), apb_grpc.AdapterServiceStub(channel))
    finally:
        await channel.close()
        if not exit_code.done():
            a.release()
            b.release()
            await server.drain(grace_s=0.0)
        await asyncio.wait_for(exit_code, 10)


async def test_a_request_runs_on_the_model_it_names_and_unset_is_the_first() -> None:
    async with two_models() as two:
        on_b = await two.stub.Generate(build_request("hi", max_new_tokens=2, request_id="r-b", model="b"))
        assert on_b.model == "b" and on_b.variant == "fp32:fake"
        assert ("generate", "r-b") in two.b.calls and ("generate", "r-b") not in two.a.calls
        default = await two.stub.Generate(build_request("hi", max_new_tokens=2, request_id="r-a"))
        assert default.model == "a" and ("generate", "r-a") in two.a.calls
        assert ("generate", "r-a") not in two.b.calls
        named = await two.stub.Generate(build_request("hi", max_new_tokens=2, request_id="r-a2", model="a"))
        assert named.model == "a" and ("generate", "r-a2") in two.a.calls
        stream = two.stub.GenerateStream(build_request("hi", max_new_tokens=2, model="b"))
        last = [m async for m in stream][-1]
        assert last.final.model == "b"
        listed = await two.stub.ListModels(pb.ListModelsRequest())
        assert [m.name for m in listed.models] == ["a", "b"]
        assert [m.fingerprint for m in listed.models] == ["fp-a", "fp-b"]
        info = await two.stub.GetModelInfo(pb.GetModelInfoRequest(model="b"))
        assert info.name == "b" and info.model == "b" and [v.name for v in info.variants] == ["fp32:fake"]
        assert (await two.stub.GetModelInfo(pb.GetModelInfoRequest())).name == "a"
        stats = await two.stub.GetStats(pb.GetStatsRequest())
        assert stats.requests_total == 4  # both models' runners


async def test_an_unknown_model_is_not_found_naming_the_field() -> None:
    async with two_models() as two:
        err = await two.refusal(two.stub.Generate(build_request("hi", max_new_tokens=2, model="c")))
        assert err.code() == grpc.StatusCode.NOT_FOUND
        assert (err.details() or "").startswith("model: 'c'") and "a, b" in (err.details() or "")
        err = await two.refusal(two.stub.GetModelInfo(pb.GetModelInfoRequest(model="c")))
        assert err.code() == grpc.StatusCode.NOT_FOUND and (err.details() or "").startswith("model:")
        err = await two.refusal(two.adapters.ListAdapters(apb.ListAdaptersRequest(model="c")))
        assert err.code() == grpc.StatusCode.NOT_FOUND and (err.details() or "").startswith("model:")
        assert not [c for c in two.a.calls + two.b.calls if c[0] == "generate"]  # nothing ran


async def test_a_flood_on_one_model_fills_its_queue_only() -> None:
    async with two_models(max_concurrency=1, queue_size=1) as two:
        held = two.stub.GenerateStream(build_request("x", max_new_tokens=4, request_id="hold-1"), timeout=10)
        await first_message(held)
        queued = asyncio.ensure_future(
            two.stub.Generate(build_request("y", max_new_tokens=4, request_id="hold-2"), timeout=10)
        )
        await until(lambda: two.server.models.get("a").variants.queued == 1)
        full = await two.refusal(two.stub.Generate(build_request("z", max_new_tokens=2), timeout=5))
        assert full.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        # model b has its own slot and queue: served at once while a's are full
        b = await two.stub.Generate(build_request("z", max_new_tokens=2, model="b"), timeout=2)
        assert b.model == "b" and b.finish_reason == pb.FINISH_REASON_LENGTH and b.timings.queue_s < 0.5
        two.a.release()
        assert (await the_rest(held))[-1].final.finish_reason == pb.FINISH_REASON_LENGTH
        assert (await asyncio.wait_for(queued, 5)).model == "a"


async def test_an_adapter_on_another_models_base_is_refused_naming_both(adapter_root) -> None:
    methods = {"adapter_methods": ("lora", "rslora"), "max_adapter_rank": 64}
    a = FakeEngine(model="a", fingerprint=adapter_root.fingerprint)
    b = FakeEngine(model="b", fingerprint="f" * 64)
    a.info, b.info = replace(a.info, **methods), replace(b.info, **methods)
    async with two_models(a, b, root=adapter_root) as two:
        # rs/1's manifest names model a's fingerprint: loading it for b names both models
        err = await two.refusal(two.adapters.LoadAdapter(apb.LoadAdapterRequest(name="rs", model="b")))
        assert err.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "belongs to model a" in (err.details() or "") and "not to model b" in (err.details() or "")
        loaded = await two.adapters.LoadAdapter(apb.LoadAdapterRequest(name="rs"))
        assert loaded.model == "a" and "rs@1" in a.adapters and not b.adapters
        # a request on b naming a's adapter, and a pin of it on b: refused naming both, nothing runs
        call = two.stub.Generate(build_request("hi", max_new_tokens=2, adapter="rs", model="b"))
        err = await two.refusal(call)
        assert err.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "for model a, not for model b" in (err.details() or "")
        err = await two.refusal(two.adapters.PinAdapter(apb.PinAdapterRequest(name="rs", model="b")))
        assert err.code() == grpc.StatusCode.FAILED_PRECONDITION and "model a" in (err.details() or "")
        assert not [c for c in two.b.calls if c[0] == "generate"]
        served = await two.stub.Generate(build_request("hi", max_new_tokens=2, adapter="rs", model="a"))
        assert served.adapter == "rs@1" and served.model == "a"
        on_a = await two.adapters.ListAdapters(apb.ListAdaptersRequest(model="a"))
        on_b = await two.adapters.ListAdapters(apb.ListAdaptersRequest(model="b"))
        assert [i.name for i in on_a.adapters] == ["rs"] and not on_b.adapters
