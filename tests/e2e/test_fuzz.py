"""Hypothesis fuzzing of every RPC's fields against the real server: >= 2,000 generated requests per run.

Each answer must be OK or one of the documented refusals, never UNKNOWN / INTERNAL / a hang, and the
server must be healthy and idle afterwards. Requests stay cheap: a valid one asks for at most 4 new tokens;
everything else is refused before it reaches the engine.
"""

from __future__ import annotations

import string
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from effllm.api.v1 import generation_pb2 as pb
from effllm.api.v1 import generation_pb2_grpc as pb_grpc
from effllm.client import EffllmClient

from ..serverproc import ServerProcess
from .conftest import Hardened

BATCH = 10
EXAMPLES = 205  # x BATCH = 2,050 generation requests
ALLOWED = {"OK", "INVALID_ARGUMENT", "FAILED_PRECONDITION", "NOT_FOUND", "RESOURCE_EXHAUSTED"}
INT32 = st.integers(-(2**31), 2**31 - 1)
FLOAT32 = st.floats(width=32, allow_nan=True, allow_infinity=True)
NAME_CHARS = string.ascii_letters + string.digits + "._-@/ \\:"

texts = st.one_of(st.text(max_size=60), st.sampled_from(["", " ", "\n", "\x00", "Hello", "{{ bos_token }}"]))
names = st.one_of(
    st.text(max_size=40),
    st.text(alphabet=NAME_CHARS, max_size=140),
    st.sampled_from(["", "a", "a@1", "../x", "x@", "@1", "a" * 129]),
)
roles = st.one_of(st.sampled_from(["system", "user", "assistant", "tool", "", "USER"]), st.text(max_size=10))

sampling = st.builds(
    pb.SamplingParams,
    # 0 (the server default, 128 tokens) is left out to keep runs cheap; >= the context is refused.
    max_new_tokens=st.one_of(st.integers(1, 4), st.integers(-(2**31), -1), st.integers(1024, 2**31 - 1)),
    temperature=st.one_of(st.none(), FLOAT32, st.floats(0, 2, width=32)),
    top_p=st.one_of(st.none(), FLOAT32, st.floats(0, 1, width=32)),
    top_k=st.one_of(st.integers(-2, 100), INT32),
    seed=st.one_of(st.none(), st.integers(0, 2**64 - 1)),
    stop=st.lists(st.one_of(texts, st.text(min_size=250, max_size=300)), max_size=20),
    repetition_penalty=st.one_of(st.none(), FLOAT32, st.floats(0.5, 2, width=32)),
)


@st.composite
def generate_requests(draw: st.DrawFn) -> pb.GenerateRequest:
    # Two in three requests leave adapter and request_id empty, so that enough of them are valid and really
    # generate (the rest are refused before the engine).
    blank_or = st.one_of(st.just(""), st.just(""), names)
    req = pb.GenerateRequest(adapter=draw(blank_or), request_id=draw(blank_or))
    which = draw(st.sampled_from(["prompt", "messages", "none"]))
    if which == "prompt":
        req.prompt = draw(texts)
    elif which == "messages":
        turns = draw(st.lists(st.tuples(roles, texts), max_size=4))
        req.messages.SetInParent()
        req.messages.messages.extend(pb.ChatMessage(role=r, content=c) for r, c in turns)
    if draw(st.booleans()):
        req.sampling.CopyFrom(draw(sampling))
    else:
        req.sampling.max_new_tokens = draw(st.integers(1, 3))
    return req


def _call(stub: pb_grpc.GenerationServiceStub, req: pb.GenerateRequest, streaming: bool) -> str:
    try:
        if streaming:
            chunks = list(stub.GenerateStream(req, timeout=60))
            assert chunks and chunks[-1].HasField("final")
        else:
            stub.Generate(req, timeout=60)
        return "OK"
    except grpc.RpcError as err:
        code = err.code().name
        assert code in ALLOWED, f"{code}: {err.details()} for {req}"
        return code


@pytest.fixture(scope="module")
def channel(vllm_server: ServerProcess) -> grpc.Channel:
    ch = grpc.insecure_channel(vllm_server.target)
    yield ch
    ch.close()


CODES: Counter[str] = Counter()


def test_fuzz_generation_service(channel: grpc.Channel, vllm_server: ServerProcess) -> None:
    stub = pb_grpc.GenerationServiceStub(channel)
    pool = ThreadPoolExecutor(BATCH)

    @settings(
        max_examples=EXAMPLES,
        deadline=None,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )
    @given(batch=st.lists(st.tuples(generate_requests(), st.booleans()), min_size=BATCH, max_size=BATCH))
    def run(batch: list[tuple[pb.GenerateRequest, bool]]) -> None:
        for code in pool.map(lambda item: _call(stub, *item), batch):
            CODES[code] += 1

    try:
        run()
    finally:
        pool.shutdown()
    print(f"fuzz: {sum(CODES.values())} generation requests: {dict(CODES)}")
    assert sum(CODES.values()) >= 2000
    assert CODES["OK"] >= 50 and CODES["INVALID_ARGUMENT"] >= 100  # both paths were really exercised
    _assert_alive(vllm_server)


@settings(max_examples=60, deadline=None, database=None)
@given(service=st.one_of(st.text(max_size=80), st.sampled_from(["", "effllm.v1.GenerationService"])))
def test_fuzz_health_and_info(channel: grpc.Channel, service: str) -> None:
    stub = pb_grpc.GenerationServiceStub(channel)
    assert stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=10).max_context > 0
    assert stub.GetStats(pb.GetStatsRequest(), timeout=10).requests_total >= 0
    try:
        reply = health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service=service), timeout=10
        )
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
    except grpc.RpcError as err:
        assert err.code() == grpc.StatusCode.NOT_FOUND, err.details()


def test_fuzz_adapter_service(hardened: Hardened) -> None:
    """AdapterService fields (names, versions, relative paths that try to escape the root, wait times) on
    the hardened server, which has an adapter root, with the admin token."""
    from effllm.api.v1 import adapters_pb2 as apb
    from effllm.api.v1 import adapters_pb2_grpc as apb_grpc

    client = EffllmClient(hardened.server.target, security=hardened.security("admin"), timeout=30)
    stub = apb_grpc.AdapterServiceStub(client.channel)
    stub.ListAdapters(apb.ListAdaptersRequest(), timeout=10)  # the service is there: no skip can hide it
    codes: Counter[str] = Counter()
    adapter_names = st.one_of(names, st.sampled_from(["good", "good@1", "../good", "good/../good"]))
    paths = st.one_of(names, st.sampled_from(["good/1", "/etc", "../../etc/passwd", "good/1/../../..", "."]))

    @settings(max_examples=150, deadline=None, database=None)
    @given(
        name=adapter_names,
        version=st.one_of(names, st.sampled_from(["1", "2", ".."])),
        path=paths,
        wait=st.floats(width=64),
        pinned=st.booleans(),
        which=st.sampled_from(["load", "unload", "pin"]),
    )
    def run(name: str, version: str, path: str, wait: float, pinned: bool, which: str) -> None:
        try:
            if which == "load":
                stub.LoadAdapter(apb.LoadAdapterRequest(name=name, version=version, path=path), timeout=60)
            elif which == "unload":
                stub.UnloadAdapter(
                    apb.UnloadAdapterRequest(name=name, version=version, wait_s=wait), timeout=60
                )
            else:
                stub.PinAdapter(apb.PinAdapterRequest(name=name, version=version, pinned=pinned), timeout=60)
            codes["OK"] += 1
        except grpc.RpcError as err:
            assert err.code().name in ALLOWED, f"{which}: {err.code().name}: {err.details()}"
            codes[err.code().name] += 1

    try:
        run()
        print(f"adapter fuzz: {dict(codes)}")
        for a in client.list_adapters():  # whatever the fuzz loaded must be servable
            if a.pinned:
                client.pin_adapter(a.name, a.version, pinned=False)
            client.unload_adapter(a.name, a.version)
        assert client.health() == "SERVING"
    finally:
        client.close()


def _assert_alive(server: ServerProcess) -> None:
    assert server.proc.poll() is None
    with server.client(timeout=30) as c:
        assert c.health() == "SERVING"
        stats = c.stats()
        assert stats.running == 0 and stats.queued == 0 and stats.engine_running == 0
        assert c.generate("Say hi", max_new_tokens=2).usage.output_tokens >= 1
