"""The real server (vLLM engine, real SmolLM2) over real gRPC: unary, streaming, chat, stop, seeds,
concurrency, cancellation, bad input, GetModelInfo, reflection."""

from __future__ import annotations

import asyncio
import time

import grpc
import pytest
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

from effllm.api.v1 import generation_pb2 as pb
from effllm.client import AsyncEffllmClient

from ..serverproc import ServerProcess

PROMPT = "The three primary colours are"


def test_unary_generate(vllm_server: ServerProcess) -> None:
    with vllm_server.client() as c:
        r = c.generate(PROMPT, max_new_tokens=12, temperature=0.0)
    assert r.text.strip()
    assert len(r.token_ids) == r.usage.output_tokens <= 12
    assert r.usage.input_tokens > 0
    assert r.finish_reason in (pb.FINISH_REASON_LENGTH, pb.FINISH_REASON_STOP)
    t = r.timings
    assert 0 <= t.queue_s <= t.time_to_first_token_s <= t.total_s
    assert t.decode_s <= t.total_s


def test_stream_equals_unary_for_greedy(vllm_server: ServerProcess) -> None:
    with vllm_server.client() as c:
        unary = c.generate(PROMPT, max_new_tokens=16, temperature=0.0)
        chunks = list(c.stream(PROMPT, max_new_tokens=16, temperature=0.0))
    assert len(chunks) >= 2, "a 16-token answer should arrive in several messages"
    assert all(not ch.HasField("final") for ch in chunks[:-1]) and chunks[-1].HasField("final")
    assert "".join(ch.text for ch in chunks) == unary.text
    streamed_ids = [i for ch in chunks for i in ch.token_ids]
    assert streamed_ids == list(unary.token_ids)
    assert chunks[-1].final.usage.output_tokens == len(streamed_ids)
    assert len({ch.request_id for ch in chunks}) == 1


def test_chat_template_is_applied(vllm_server: ServerProcess) -> None:
    from transformers import AutoTokenizer

    from effllm.common.model import resolve_model

    turns = [("system", "You answer in one word."), ("user", "What is the capital of France?")]
    with vllm_server.client() as c:
        r = c.generate(messages=turns, max_new_tokens=8, temperature=0.0)
    tok = AutoTokenizer.from_pretrained(resolve_model(None).path)
    rendered = tok.apply_chat_template(
        [{"role": a, "content": b} for a, b in turns], add_generation_prompt=True, tokenize=False
    )
    assert "<|im_start|>assistant" in rendered
    assert r.usage.input_tokens == len(tok.encode(rendered))
    assert "Paris" in r.text


def test_stop_string_cuts_the_text(vllm_server: ServerProcess) -> None:
    with vllm_server.client() as c:
        full = c.generate(PROMPT, max_new_tokens=24, temperature=0.0).text
        words = full.split()
        assert len(words) >= 3, full
        stop = words[2]
        cut = c.generate(PROMPT, max_new_tokens=24, temperature=0.0, stop=[stop])
    assert cut.finish_reason == pb.FINISH_REASON_STOP
    assert stop not in cut.text
    assert full.startswith(cut.text) and len(cut.text) < len(full)


def test_ignore_eos_decodes_exactly_max_new_tokens(vllm_server: ServerProcess) -> None:
    turns = [("user", "What is the capital of France? Answer in one word.")]
    with vllm_server.client() as c:
        short = c.generate(messages=turns, max_new_tokens=32, temperature=0.0)
        full = c.generate(messages=turns, max_new_tokens=32, temperature=0.0, ignore_eos=True)
    assert short.finish_reason == pb.FINISH_REASON_STOP and len(short.token_ids) < 32  # ended by itself
    assert full.finish_reason == pb.FINISH_REASON_LENGTH and full.usage.output_tokens == 32
    assert list(full.token_ids[: len(short.token_ids)]) == list(short.token_ids)


def test_same_seed_same_text(vllm_server: ServerProcess) -> None:
    kw = dict(max_new_tokens=24, temperature=1.0, top_p=0.95)
    with vllm_server.client() as c:
        a = c.generate(PROMPT, seed=1234, **kw).text
        b = c.generate(PROMPT, seed=1234, **kw).text
        others = {c.generate(PROMPT, seed=s, **kw).text for s in (1, 2, 3)}
    assert a == b
    assert len(others | {a}) > 1, "different seeds should sample different texts"


@pytest.mark.parametrize("seed", [0, 2**63 - 1, 2**63, 2**64 - 1])
def test_timings_fit_inside_the_call_for_any_seed(vllm_server: ServerProcess, seed: int) -> None:
    """Issue 16 finding 11 (queue_s 9.9 s on a 0.11 s call with seed 2^64-1): every timing is measured
    inside the call, so none can exceed the wall time the client saw; an idle server queues nothing. Not
    reproduced with any seed on this engine; this pins the invariant down."""
    kw = dict(max_new_tokens=4, temperature=1.0, ignore_eos=True)
    with vllm_server.client() as c:
        c.generate(PROMPT, seed=seed, **kw)  # an idle server from here on
        t0 = time.perf_counter()
        reply = c.generate(PROMPT, seed=seed, **kw)
        wall = time.perf_counter() - t0
    t = reply.timings
    assert reply.usage.output_tokens == 4
    assert 0 <= t.queue_s <= t.time_to_first_token_s <= t.total_s <= wall, (t, wall)
    assert t.queue_s < 0.5, t  # nothing else was running: admission is immediate


async def test_sixteen_concurrent_streams(vllm_server: ServerProcess) -> None:
    async def one(i: int) -> tuple[int, int, int]:
        ids: list[int] = []
        final = None
        async for ch in client.stream(f"Count from {i} to {i + 30}:", max_new_tokens=20, temperature=0.0):
            ids.extend(ch.token_ids)
            if ch.HasField("final"):
                final = ch.final
        assert final is not None
        return len(ids), final.usage.output_tokens, final.finish_reason

    async with AsyncEffllmClient(vllm_server.target) as client:
        results = await asyncio.gather(*(one(i) for i in range(16)))
        stats = await client.stats()
    for n_streamed, n_reported, reason in results:
        assert n_streamed == n_reported
        assert n_reported == 20 or reason == pb.FINISH_REASON_STOP
    assert stats.running == 0 and stats.queued == 0


def _wait_idle(client, timeout: float = 10.0) -> pb.ServerStats:
    deadline = time.monotonic() + timeout
    while True:
        s = client.stats()
        if (s.running == 0 and s.engine_running == 0) or time.monotonic() > deadline:
            return s
        time.sleep(0.05)


def test_cancel_frees_the_slot(vllm_server: ServerProcess) -> None:
    with vllm_server.client() as c:
        before = c.stats()
        stream = c.stream(PROMPT, max_new_tokens=400, temperature=0.0)
        next(stream)
        next(stream)
        assert c.stats().running >= 1 and c.stats().engine_running >= 1
        stream.close()  # cancels the RPC
        after = _wait_idle(c)
    assert after.running == 0 and after.engine_running == 0
    assert after.requests_cancelled >= before.requests_cancelled + 1


def test_deadline_aborts_the_engine_request(vllm_server: ServerProcess) -> None:
    with vllm_server.client() as c:
        with pytest.raises(grpc.RpcError) as err:
            c.generate(PROMPT, max_new_tokens=400, timeout=0.5)
        assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        after = _wait_idle(c)
    assert after.running == 0 and after.engine_running == 0


@pytest.mark.parametrize(
    ("kw", "code", "words"),
    [
        ({"prompt": " "}, grpc.StatusCode.INVALID_ARGUMENT, "prompt"),
        ({"prompt": "x", "max_new_tokens": -5}, grpc.StatusCode.INVALID_ARGUMENT, "max_new_tokens"),
        ({"prompt": "x", "max_new_tokens": 5000}, grpc.StatusCode.INVALID_ARGUMENT, "max_new_tokens"),
        ({"prompt": "x", "temperature": -1.0}, grpc.StatusCode.INVALID_ARGUMENT, "temperature"),
        (
            {"prompt": "x", "temperature": 3.0},
            grpc.StatusCode.INVALID_ARGUMENT,
            "temperature",
        ),  # vLLM's bound
        ({"prompt": "x", "top_p": 0.0}, grpc.StatusCode.INVALID_ARGUMENT, "top_p"),
        ({"prompt": "x", "top_p": 1.01}, grpc.StatusCode.INVALID_ARGUMENT, "top_p"),
        ({"prompt": "x", "adapter": "nosuch"}, grpc.StatusCode.NOT_FOUND, "nosuch"),
        ({"prompt": "word " * 1100}, grpc.StatusCode.INVALID_ARGUMENT, "context"),
        ({"messages": [("wizard", "hi")]}, grpc.StatusCode.INVALID_ARGUMENT, "role"),
    ],
)
def test_bad_input_gets_a_status_and_the_server_keeps_serving(
    vllm_server: ServerProcess, kw: dict, code: grpc.StatusCode, words: str
) -> None:
    with vllm_server.client() as c:
        for call in (c.generate, lambda **k: list(c.stream(**k))):
            with pytest.raises(grpc.RpcError) as err:
                call(**kw)
            assert err.value.code() == code, err.value.details()
            assert words in err.value.details()
        assert c.generate("Hello", max_new_tokens=2).usage.output_tokens >= 1


def test_empty_request_is_invalid(vllm_server: ServerProcess) -> None:
    from effllm.api.v1 import generation_pb2_grpc as pb_grpc

    with grpc.insecure_channel(vllm_server.target) as ch:
        with pytest.raises(grpc.RpcError) as err:
            pb_grpc.GenerationServiceStub(ch).Generate(pb.GenerateRequest(), timeout=10)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "input" in err.value.details()


def test_model_info(vllm_server: ServerProcess) -> None:
    with vllm_server.client() as c:
        info = c.model_info()
    assert info.model == "SmolLM2-135M-Instruct" and info.engine == "vllm" and info.precision == "fp32"
    assert len(info.fingerprint) == 64 and info.max_context == 1024 and info.device == "cpu"
    assert 130e6 < info.parameters < 140e6
    assert info.weight_bytes == 4 * info.parameters and info.weight_ratio_to_bf16 == pytest.approx(2.0)
    assert {"fp32", "bf16"} <= set(info.capabilities.precisions)
    assert info.max_concurrency == 8 and info.queue_size == 32


def test_reflection_lists_the_services(vllm_server: ServerProcess) -> None:
    with grpc.insecure_channel(vllm_server.target) as ch:
        services = set(ProtoReflectionDescriptorDatabase(ch).get_services())
    assert {
        "effllm.v1.GenerationService",
        "grpc.health.v1.Health",
        "grpc.reflection.v1alpha.ServerReflection",
    } <= services
