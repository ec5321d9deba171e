"""`--engine auto`: vLLM unless the precision or an adapter method needs the hf engine."""

from __future__ import annotations

from typing import Any

import pytest

from effllm.server.engine_args import EngineArgs, build_engine, choose_engine


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


@pytest.mark.parametrize(
    ("speed", "eager", "interval", "bind"),
    [
        ({}, True, 1, None),
        ({"vllm_compile": True, "stream_interval": 4, "cpu_omp_bind": "auto"}, False, 4, "auto"),
        ({"cpu_omp_bind": "0-1|2,3"}, True, 1, "0-1|2,3"),
    ],
)
@pytest.mark.model
def test_vllm_speed_flags_reach_the_engine(
    speed: dict[str, Any], eager: bool, interval: int, bind: str | None
) -> None:
    """`--vllm-compile`, `--stream-interval` and `--cpu-omp-bind` end up in the engine's config, which
    start() hands to AsyncEngineArgs (enforce_eager, stream_interval) and to vLLM's environment."""
    from effllm.server.engines.vllm_engine import VllmEngine

    engine = build_engine(EngineArgs(engine="vllm", device="cpu", **speed))
    assert isinstance(engine, VllmEngine)
    assert (engine.config.enforce_eager, engine.config.stream_interval) == (eager, interval)
    assert engine.config.cpu_omp_bind == bind


@pytest.mark.model
@pytest.mark.parametrize("bad", [{"stream_interval": 0}, {"cpu_omp_bind": "all; rm -rf /"}])
def test_bad_vllm_speed_flags_are_refused(bad: dict[str, Any]) -> None:
    (name,) = bad
    with pytest.raises(ValueError, match=name):
        build_engine(EngineArgs(engine="vllm", device="cpu", **bad))


def test_cpu_omp_bind_flag_beats_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    from effllm.server.engines.vllm_engine import apply_cpu_omp_bind

    monkeypatch.delenv("VLLM_CPU_OMP_THREADS_BIND", raising=False)
    assert apply_cpu_omp_bind(None) == "nobind"  # our default: threads unpinned
    monkeypatch.setenv("VLLM_CPU_OMP_THREADS_BIND", "auto")
    assert apply_cpu_omp_bind(None) == "auto"  # the environment's, when no flag
    assert apply_cpu_omp_bind("0") == "0"
    import os

    assert os.environ["VLLM_CPU_OMP_THREADS_BIND"] == "0"  # what vLLM's worker will read
