"""The architecture axis read from config.json, engine_support's refusals (each with its way out), and
`effllm serve` refusing an architecture at start-up, before any engine loads. Configs only: fast tier."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from effllm.common.architecture import describe, engine_support
from effllm.common.family import MEMBERS, Shape, family_configs

SMOLLM2 = {
    "model_type": "llama",
    "hidden_size": 576,
    "num_hidden_layers": 30,
    "num_attention_heads": 9,
    "num_key_value_heads": 3,
    "head_dim": 64,
}
GEMMA3 = {
    "model_type": "gemma3_text",
    "hidden_size": 640,
    "num_hidden_layers": 18,
    "num_attention_heads": 4,
    "num_key_value_heads": 1,
    "head_dim": 256,
    "sliding_window": 512,
    "layer_types": (["sliding_attention"] * 5 + ["full_attention"]) * 3,
}
FAMILY = family_configs(Shape())


def test_attention_kinds_and_kv_bytes() -> None:
    smol = describe(SMOLLM2)
    assert (smol.family, smol.attention, smol.kv_heads) == ("transformer", "GQA", 3)
    assert smol.kv_bytes_per_token(4) == 2 * 30 * 3 * 64 * 4  # K and V, every layer, fp32
    gemma = describe(GEMMA3)
    assert (gemma.attention, gemma.sliding_layers, gemma.sliding_window) == ("MQA", 15, 512)
    kinds = {m: describe(c).attention for m, c in FAMILY.items()}
    assert kinds == {
        "mha": "MHA",
        "gqa": "GQA",
        "mqa": "MQA",
        "mla": "MLA",
        "moe": "GQA",
        "mamba2": "none",
        "gpt-neox": "MHA",
        "rwkv": "none",
        "mamba": "none",
    }
    mla = describe(FAMILY["mla"])
    assert mla.kv_bytes_per_token(2) == 4 * (512 + 64) * 2  # the latent and the rope key, bf16
    assert describe(FAMILY["mamba"]).kv_bytes_per_token(4) == 0


def test_moe_runs_as_many_parameters_per_token_as_the_dense_mlp() -> None:
    moe = describe(FAMILY["moe"])
    assert (moe.experts, moe.top_k, moe.moe_layers) == (8, 2, 4)
    assert moe.top_k * moe.expert_intermediate == Shape().intermediate
    skipped = 4 * 6 * 3 * 128 * 192  # 6 idle experts of gate/up/down per layer
    assert moe.active_parameters(10_000_000) == 10_000_000 - skipped
    assert describe(FAMILY["mla"]).experts == 0, "the MLA member is dense (first_k_dense_replace)"


def test_family_shares_width_depth_and_vocab_and_says_random_init() -> None:
    assert set(FAMILY) == set(MEMBERS)
    for member, config in FAMILY.items():
        arch = describe(config)
        assert (arch.layers, arch.hidden) == (4, 128), member
        assert config["vocab_size"] == 49152 and config["tie_word_embeddings"] is True, member
        assert arch.random_init and config["effllm_family"]["random_init"] is True, member
    assert not describe(SMOLLM2).random_init


@pytest.mark.parametrize(
    ("engine", "config", "kwargs", "refusal"),
    [
        ("vllm", FAMILY["rwkv"], {}, "rwkv: vLLM has no RWKV model; use --engine hf"),
        ("vllm", FAMILY["mamba"], {}, "cannot prefill Mamba-1.*use --engine hf"),
        ("vllm", FAMILY["mla"], {"precision": "fp32"}, "MLA in bf16 only.*--precision bf16"),
        ("vllm", {**FAMILY["mla"], "kv_lora_rank": 256}, {"precision": "bf16"}, "kv_lora_rank 512.*hf"),
        ("vllm", {**FAMILY["moe"], "moe_intermediate_size": 200}, {}, "multiples of 32.*--engine hf"),
        ("vllm", {**SMOLLM2, "index_topk": 2048}, {}, "NSA"),
        ("hf", {**SMOLLM2, "index_topk": 2048}, {}, "NSA"),
        ("hf", FAMILY["rwkv"], {}, "recurrent SSM/RWKV state"),
        ("hf", FAMILY["mamba2"], {}, "use --engine vllm"),
        ("hf", GEMMA3, {"max_concurrency": 4}, "sliding-window.*--max-concurrency 1"),
    ],
)
def test_refusals_name_the_reason_and_the_way_out(
    engine: str, config: dict[str, Any], kwargs: dict[str, Any], refusal: str
) -> None:
    ok, reason = engine_support(engine, config, **kwargs)
    assert not ok
    assert __import__("re").search(refusal, reason), reason


@pytest.mark.parametrize(
    ("engine", "config", "kwargs"),
    [
        ("vllm", SMOLLM2, {}),
        ("hf", SMOLLM2, {"max_concurrency": 32}),
        ("vllm", GEMMA3, {"max_concurrency": 32}),
        ("hf", GEMMA3, {"max_concurrency": 1}),
        ("vllm", FAMILY["mla"], {"precision": "bf16"}),
        ("hf", FAMILY["mla"], {"max_concurrency": 4}),
        ("vllm", FAMILY["moe"], {}),
        ("vllm", FAMILY["mamba2"], {}),
        ("hf", FAMILY["gpt-neox"], {"max_concurrency": 4}),
    ],
)
def test_what_the_engines_run_is_let_through(
    engine: str, config: dict[str, Any], kwargs: dict[str, Any]
) -> None:
    assert engine_support(engine, config, **kwargs) == (True, "")


def test_serve_refuses_at_start_up_before_the_engine_loads(tmp_path: Path) -> None:
    """A checkpoint dir with an RWKV config.json and no weights: serving it on vLLM must exit 2 naming the
    reason, before any engine (which would fail on the missing weights, differently) is built."""
    model = tmp_path / "rwkv-tiny"
    model.mkdir()
    (model / "config.json").write_text(json.dumps(FAMILY["rwkv"]))
    flags = ["--engine", "vllm", "--device", "cpu", "--run-dir", str(tmp_path / "run"), "--no-telemetry"]
    out = subprocess.run(
        [sys.executable, "-m", "effllm.cli.main", "serve", "--model", str(model), *flags, "--port", "0"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
    )
    assert out.returncode == 2, out.stderr[-2000:]
    assert "rwkv: vLLM has no RWKV model; use --engine hf" in out.stderr + out.stdout
