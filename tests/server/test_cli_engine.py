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


@pytest.mark.parametrize(("flags", "eager"), [([], True), (["--vllm-compile"], False)])
def test_vllm_compile_flag_reaches_the_engine(flags: list[str], eager: bool) -> None:
    """`--vllm-compile` turns vLLM's enforce_eager off (the engine passes it to AsyncEngineArgs as is)."""
    from effllm.cli.main import build_parser
    from effllm.server.cli import build_engine
    from effllm.server.engines.vllm_engine import VllmEngine

    args = build_parser().parse_args(["serve", "--engine", "vllm", "--device", "cpu", *flags])
    engine = build_engine(args)
    assert isinstance(engine, VllmEngine) and engine.config.enforce_eager is eager
