"""EngineArgs is the one source of the engine flags' defaults: every engine flag of `effllm serve` and
`effllm calibrate` has its field's default, `from_cli_args` reads back what the flags set, and the engine
configs' shared defaults are the same numbers. Pure: no model, no engine."""

from __future__ import annotations

import argparse
from dataclasses import fields, replace
from pathlib import Path
from typing import Any

import pytest

from effllm.server.app import ServerConfig
from effllm.server.engine_args import EngineArgs
from effllm.server.engines.hf_engine import HfConfig
from effllm.server.engines.vllm_engine import VllmConfig


def serve_parser() -> argparse.ArgumentParser:
    from effllm.cli.main import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices["serve"]


def test_every_engine_flag_has_its_fields_default() -> None:
    parser = serve_parser()
    by_dest = {a.dest: a for a in parser._actions}
    for f in fields(EngineArgs):
        assert f.name in by_dest, f"EngineArgs.{f.name} has no flag"
        default = by_dest[f.name].default
        assert (tuple(default) if isinstance(default, list) else default) == f.default, f.name
    assert EngineArgs.from_cli_args(parser.parse_args([])) == EngineArgs()


def test_from_cli_args_reads_what_the_flags_set(tmp_path: Path) -> None:
    flags = {
        "--model": ("tiny", "model", "tiny"),
        "--engine": ("hf", "engine", "hf"),
        "--adapter-methods": ("lora,dora", "adapter_methods", "lora,dora"),
        "--precision": ("int4", "precision", "int4"),
        "--device": ("cpu", "device", "cpu"),
        "--max-concurrency": ("3", "max_concurrency", 3),
        "--max-context": ("512", "max_context", 512),
        "--kv-cache-gib": ("0.5", "kv_cache_gib", 0.5),
        "--tensor-parallel-size": ("2", "tensor_parallel_size", 2),
        "--compile-threads": ("0", "compile_threads", 0),
        "--stream-interval": ("4", "stream_interval", 4),
        "--cpu-omp-bind": ("auto", "cpu_omp_bind", "auto"),
        "--seed": ("7", "seed", 7),
        "--adapter-root": (str(tmp_path), "adapter_root", tmp_path),
        "--max-adapters-per-batch": ("2", "max_adapters_per_batch", 2),
        "--max-adapters-resident": ("5", "max_adapters_resident", 5),
        "--max-adapter-rank": ("16", "max_adapter_rank", 16),
    }
    argv = [x for flag, (value, _, _) in flags.items() for x in (flag, value)]
    argv += ["--variant", "bf16", "--variant", "int4:hf", "--vllm-compile", "--no-compile-decode"]
    argv += ["--model", "other", "--model", "third=/x", "--model-max-concurrency", "third=1"]
    got = EngineArgs.from_cli_args(serve_parser().parse_args(argv))
    want: dict[str, Any] = {name: value for _, name, value in flags.values()}
    want.update(variants=("bf16", "int4:hf"), vllm_compile=True, compile_decode=False)
    want.update(more_models=("other", "third=/x"), model_max_concurrency=("third=1",))
    assert got == EngineArgs(**want)
    assert set(want) == {f.name for f in fields(EngineArgs)}  # every field is covered above


def test_calibrate_takes_the_same_engine_flags_with_its_own_concurrency() -> None:
    from effllm.cli.main import build_parser

    args = build_parser().parse_args(["calibrate", "--engine", "hf", "--compile-decode"])
    got = EngineArgs.from_cli_args(args)
    assert got == EngineArgs(engine="hf", compile_decode=True, max_concurrency=8)


def test_a_json_round_trip_gives_the_same_args(tmp_path: Path) -> None:
    """`effllm calibrate` hands the flags to its child as JSON (lists, str paths): the same EngineArgs."""
    import json

    args = serve_parser().parse_args(["--variant", "fp32", "--adapter-root", str(tmp_path)])
    spec = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k != "func"}
    back = argparse.Namespace(**json.loads(json.dumps(spec)))
    assert EngineArgs.from_cli_args(back) == EngineArgs.from_cli_args(args)


@pytest.mark.parametrize(
    ("config", "pairs"),
    [
        (
            HfConfig(),
            {
                "max_context": "max_context",
                "max_concurrency": "max_concurrency",
                "seed": "seed",
                "compile_threads": "compile_threads",
                "max_adapter_rank": "max_adapter_rank",
                "max_adapters_per_batch": "max_adapters_per_batch",
                "max_adapters_resident": "max_adapters_resident",
            },
        ),
        (
            VllmConfig(),
            {
                "max_context": "max_context",
                "max_concurrency": "max_concurrency",
                "seed": "seed",
                "kv_cache_gib": "kv_cache_gib",
                "tensor_parallel_size": "tensor_parallel_size",
                "stream_interval": "stream_interval",
                "cpu_omp_bind": "cpu_omp_bind",
                "max_lora_rank": "max_adapter_rank",
                "max_loras": "max_adapters_per_batch",
                "max_cpu_loras": "max_adapters_resident",
            },
        ),
        (ServerConfig(), {"max_concurrency": "max_concurrency"}),
    ],
    ids=["hf", "vllm", "server"],
)
def test_the_engine_configs_share_its_defaults(config: Any, pairs: dict[str, str]) -> None:
    defaults = EngineArgs()
    assert {k: getattr(config, k) for k in pairs} == {k: getattr(defaults, v) for k, v in pairs.items()}
    if isinstance(config, VllmConfig):
        assert config.enforce_eager is not defaults.vllm_compile


@pytest.mark.parametrize(
    ("bad", "field"),
    [({"engine": "tgi"}, "engine"), ({"precision": "int8"}, "precision"), ({"device": "tpu"}, "device")],
)
def test_bad_values_are_refused_by_name(bad: dict[str, Any], field: str) -> None:
    with pytest.raises(ValueError, match=field):
        EngineArgs(**bad)


def test_several_models_each_get_their_own_variants(tmp_path: Path) -> None:
    from effllm.server.engine_args import model_name, models_with_variants

    (tmp_path / "tinyfam").mkdir()
    argv = ["--model", "smollm2-135m", "--model", str(tmp_path / "tinyfam"), "--model", "g=/nowhere/x"]
    argv += ["--variant", "fp32", "--variant", "tinyfam=bf16:hf", "--variant", "g=int4:hf"]
    argv += ["--max-concurrency", "4", "--model-max-concurrency", "g=1"]
    args = EngineArgs.from_cli_args(serve_parser().parse_args(argv))
    assert args.model == "smollm2-135m" and len(args.more_models) == 2
    got = models_with_variants(args)
    assert [(n, a.model, a.variants, a.max_concurrency) for n, a in got] == [
        ("smollm2-135m", "smollm2-135m", ("fp32",), 4),
        ("tinyfam", str(tmp_path / "tinyfam"), ("bf16:hf",), 4),
        ("g", "/nowhere/x", ("int4:hf",), 1),
    ]
    assert all(a.more_models == () and a.model_max_concurrency == () for _, a in got)
    with pytest.raises(ValueError, match="'h' is not a --model"):
        models_with_variants(replace(args, model_max_concurrency=("h=1",)))
    with pytest.raises(ValueError, match="N is a whole number >= 1"):
        models_with_variants(replace(args, model_max_concurrency=("g=0",)))
    assert model_name(None) == "" and models_with_variants(EngineArgs())[0] == ("", EngineArgs())
    with pytest.raises(ValueError, match="model 'nope' is not a --model"):
        models_with_variants(replace(args, variants=("nope=fp32",)))
    with pytest.raises(ValueError, match="names a model twice"):
        models_with_variants(EngineArgs(model="a=/x", more_models=("a=/y",)))
