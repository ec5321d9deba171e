"""int4 per engine and device: which quantization each engine asks for, and what it refuses before loading."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from effllm.server.engines.hf_engine import HfConfig, adapter_methods, int4_backend
from effllm.server.engines.vllm_engine import VllmConfig, quantization_args


def checkpoint(tmp_path: Path, quantization: dict[str, object] | None = None) -> Path:
    config: dict[str, object] = {"model_type": "llama", "max_position_embeddings": 2048}
    if quantization is not None:
        config["quantization_config"] = quantization
    (tmp_path / "config.json").write_text(json.dumps(config))
    return tmp_path


def test_vllm_int4_quantizes_a_plain_checkpoint_in_flight_with_bitsandbytes(tmp_path: Path) -> None:
    path = checkpoint(tmp_path)
    assert quantization_args("int4", path) == {"dtype": "bfloat16", "quantization": "bitsandbytes"}
    assert quantization_args("bf16", path) == {"dtype": "bfloat16", "quantization": None}
    assert quantization_args("fp32", path) == {"dtype": "float32", "quantization": None}


@pytest.mark.parametrize("method", ["awq", "gptq"])
def test_vllm_int4_runs_an_awq_or_gptq_checkpoint_as_it_is(tmp_path: Path, method: str) -> None:
    path = checkpoint(tmp_path, {"quant_method": method, "bits": 4, "group_size": 128})
    assert quantization_args("int4", path) == {"dtype": "auto", "quantization": None}
    with pytest.raises(ValueError, match=f"quantized \\({method}\\).*--precision int4"):
        quantization_args("bf16", path)  # vLLM would run it quantized and we would report bf16


def test_vllm_refuses_a_quantization_it_does_not_know(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="'hqq' is not one of"):
        quantization_args("int4", checkpoint(tmp_path, {"quant_method": "hqq"}))


def test_vllm_int4_needs_cuda() -> None:
    with pytest.raises(ValueError, match=r"int4 needs CUDA.*--engine hf"):
        VllmConfig(precision="int4", device="cpu")
    assert VllmConfig(precision="int4", device="cuda").precision == "int4"


def test_hf_int4_is_torchao_on_cpu_and_nf4_with_dora_on_cuda() -> None:
    cpu, cuda = HfConfig(precision="int4"), HfConfig(precision="int4", device="cuda")
    assert (int4_backend(cpu), int4_backend(cuda)) == ("torchao", "bitsandbytes-nf4")
    assert "dora" not in adapter_methods(cpu)  # torchao's int4 tensor cannot be dequantized
    assert adapter_methods(cuda) == ("lora", "rslora", "dora")
    assert adapter_methods(HfConfig(precision="bf16")) == ("lora", "rslora", "dora")
    with pytest.raises(ValueError, match="cpu or cuda"):
        HfConfig(device="mps")


def test_serve_refuses_vllm_int4_on_cpu_with_a_message(tmp_path: Path) -> None:
    out = subprocess.run(
        [
            *(sys.executable, "-m", "effllm.cli.main", "serve", "--engine", "vllm", "--precision", "int4"),
            *("--device", "cpu", "--run-dir", str(tmp_path)),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 2, out.stderr[-2000:]
    assert "bad configuration: vllm engine: int4 needs CUDA" in out.stderr
