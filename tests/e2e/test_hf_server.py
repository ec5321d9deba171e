"""A real `effllm serve --engine hf` process at int4: model info over gRPC, unary and concurrent streams,
cancellation, and the refusal of an adapter that is not loaded."""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest

from effllm.api.v1 import generation_pb2 as pb

from ..serverproc import ServerProcess, start_server

CHAT = [("user", "What is the capital of France?")]


@pytest.fixture(scope="module")
def hf_server(logs_dir: Path) -> Iterator[ServerProcess]:
    server = start_server(
        "--engine",
        "hf",
        "--precision",
        "int4",
        "--max-concurrency",
        "4",
        "--queue-size",
        "8",
        "--max-context",
        "512",
        log_dir=logs_dir,
        env={"OMP_NUM_THREADS": "1"},
    )  # the test box is shared: no OpenMP spin-wait storms
    yield server
    server.stop()


def test_model_info_reports_hf_int4_at_under_a_third_of_bf16(hf_server: ServerProcess) -> None:
    with hf_server.client() as client:
        info = client.model_info()
    assert (info.engine, info.precision, info.device) == ("hf", "int4", "cpu")
    assert 0 < info.weight_ratio_to_bf16 <= 1 / 3
    assert info.weight_bytes == pytest.approx(info.weight_ratio_to_bf16 * info.parameters * 2, rel=1e-6)
    assert set(info.capabilities.precisions) == {"fp32", "bf16", "fp16", "int4"}
    assert list(info.capabilities.adapter_methods) == ["lora", "rslora"]


def test_generate_and_concurrent_streams(hf_server: ServerProcess) -> None:
    with hf_server.client() as client:
        reply = client.generate(messages=CHAT, max_new_tokens=8, temperature=0.0)
        assert "Paris" in reply.text
        assert reply.finish_reason in (pb.FINISH_REASON_LENGTH, pb.FINISH_REASON_STOP)  # STOP: the EOS token
        assert 0 < reply.usage.output_tokens == len(reply.token_ids) <= 8

        def stream(i: int) -> tuple[str, list[int]]:
            chunks = list(client.stream(messages=CHAT, max_new_tokens=8, temperature=0.0, request_id=f"s{i}"))
            assert chunks[-1].HasField("final")
            return "".join(c.text for c in chunks), [t for c in chunks for t in c.token_ids]

        with ThreadPoolExecutor(4) as pool:
            results = list(pool.map(stream, range(4)))
        for text, ids in results:  # greedy: batched rows give the unary answer
            assert (text, ids) == (reply.text, list(reply.token_ids))


def test_cancel_and_unknown_adapter(hf_server: ServerProcess) -> None:
    with hf_server.client() as client:
        chunks = client.stream("Count to a hundred:", max_new_tokens=200, temperature=0.0)
        next(chunks)
        chunks.close()  # cancels the call: the engine drops the row
        with pytest.raises(grpc.RpcError) as err:
            client.generate("hi", adapter="nosuch", max_new_tokens=4)
        assert err.value.code() == grpc.StatusCode.NOT_FOUND
        assert "nosuch" in (err.value.details() or "")
        reply = client.generate(messages=CHAT, max_new_tokens=4, temperature=0.0)
        assert reply.usage.output_tokens == 4
        assert client.stats().engine_running == 0
