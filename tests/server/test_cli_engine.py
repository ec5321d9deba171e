"""`--engine auto`: vLLM unless the precision or an adapter method needs the hf engine."""

from __future__ import annotations

import pytest

from effllm.server.cli import choose_engine


@pytest.mark.parametrize(
    ("engine", "precision", "device", "methods", "want"),
    [
        ("auto", "fp32", "cpu", "lora,rslora", "vllm"),
        ("auto", "bf16", "cuda", "lora", "vllm"),
        ("auto", "int4", "cpu", "lora", "hf"),  # vLLM's CPU backend has no int4
        ("auto", "int4", "cuda", "lora", "vllm"),  # bitsandbytes in vLLM on GPU
        ("auto", "fp32", "cpu", "lora, dora", "hf"),  # DoRA unmerged: hf only
        ("hf", "fp32", "cpu", "lora", "hf"),
        (
            "vllm",
            "int4",
            "cpu",
            "dora",
            "vllm",
        ),  # explicit choice wins; the engine then refuses what it cannot do
    ],
)
def test_choose_engine(engine: str, precision: str, device: str, methods: str, want: str) -> None:
    assert choose_engine(engine, precision, device, methods) == want
