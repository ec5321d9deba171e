"""The CUDA paths of issue #8, each a real `effllm serve` on the GPU; all skip cleanly without one.

- hf engine at bf16 and at int4 (bitsandbytes NF4): LoRA and DoRA requests in one batch beside base rows;
- vLLM engine at bf16 with a LoRA adapter, and at int4 (bitsandbytes in-flight), where vLLM is installed.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from ..adapterroot import AdapterRoot
from ..serverproc import ServerProcess, start_server


def _cuda() -> bool:
    try:
        import torch

        return bool(torch.cuda.is_available())
    except ImportError:
        return False


pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not _cuda(), reason="needs an NVIDIA GPU (CUDA)")]
CHAT = [("user", "Name three colours.")]


def _has(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


@pytest.fixture(scope="module", params=["bf16", "int4"])
def hf_cuda(
    request: pytest.FixtureRequest, logs_dir: Path, adapter_root: AdapterRoot
) -> Iterator[ServerProcess]:
    if request.param == "int4" and not _has("bitsandbytes"):
        pytest.skip("int4 on CUDA needs bitsandbytes (pip install effllm[gpu])")
    server = start_server(
        *("--engine", "hf", "--device", "cuda", "--precision", request.param),
        *("--adapter-root", str(adapter_root.root), "--adapter-methods", "lora,rslora,dora"),
        *("--preload", "demo@1", "--preload", "dora@1", "--max-concurrency", "8"),
        log_dir=logs_dir,
    )
    yield server
    server.stop()


def test_hf_on_cuda_serves_base_lora_and_dora_rows_together(hf_cuda: ServerProcess) -> None:
    with hf_cuda.client(timeout=120) as client:
        info = client.model_info()
        assert (info.engine, info.device) == ("hf", "cuda")
        assert "dora" in info.capabilities.adapter_methods  # NF4 keeps DoRA (torchao's CPU int4 cannot)
        if info.precision == "int4":
            assert 0 < info.weight_ratio_to_bf16 < 0.5

        def one(i: int) -> tuple[str, list[int]]:
            adapter = ("", "demo", "dora")[i % 3]
            reply = client.generate(messages=CHAT, max_new_tokens=12, temperature=0.0, adapter=adapter)
            assert reply.usage.output_tokens == len(reply.token_ids) > 0
            return reply.adapter, list(reply.token_ids)

        with ThreadPoolExecutor(9) as pool:
            replies = list(pool.map(one, range(9)))
    assert {a for a, _ in replies} == {"", "demo@1", "dora@1"}
    # Each row ran on its own adapter: no answer is shared between adapters. (Within one adapter, greedy
    # answers may differ by batch composition on a GPU, whose kernels depend on the batch size.)
    by_adapter = {a: {tuple(t) for b, t in replies if b == a} for a, _ in replies}
    answers = [t for v in by_adapter.values() for t in v]
    assert len(answers) == len(set(answers))


@pytest.mark.skipif(not _has("vllm"), reason="vLLM on CUDA: pip install effllm[gpu]")
@pytest.mark.parametrize("precision", ["bf16", "int4"])
def test_vllm_on_cuda_serves_a_lora_adapter(
    precision: str, logs_dir: Path, adapter_root: AdapterRoot
) -> None:
    if precision == "int4" and not _has("bitsandbytes"):
        pytest.skip("vLLM's in-flight int4 needs bitsandbytes")
    server = start_server(
        *("--engine", "vllm", "--device", "cuda", "--precision", precision),
        *("--adapter-root", str(adapter_root.root), "--preload", "demo@1"),
        log_dir=logs_dir,
    )
    try:
        with server.client(timeout=120) as client:
            info = client.model_info()
            assert (info.engine, info.device, info.precision) == ("vllm", "cuda", precision)
            base = client.generate(messages=CHAT, max_new_tokens=12, temperature=0.0)
            tuned = client.generate(messages=CHAT, max_new_tokens=12, temperature=0.0, adapter="demo")
        assert base.usage.output_tokens > 0 and tuned.adapter == "demo@1"
        assert list(tuned.token_ids) != list(base.token_ids)
    finally:
        server.stop()
