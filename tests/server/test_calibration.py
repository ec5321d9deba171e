"""The `auto` rule over fake machines and calibrations, and calibration storage keyed by machine, model
and library versions (server/calibration.py)."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest

from effllm.server import calibration
from effllm.server.calibration import Calibration, Config, Figure, Key, Measured, choose_auto
from effllm.telemetry.machine import Machine, parse_cpuinfo

VERSIONS = (("torch", "2.13.0"), ("transformers", "5.19.0"), ("vllm", "0.32.0"))


def cpu(flags: str, model: str = "Fake Xeon") -> Machine:
    return parse_cpuinfo(f"model name\t: {model}\nflags\t\t: fpu {flags}\n", cores=2)


def fig(x: float) -> Figure:
    return Figure(x, x * 0.95, x * 1.05, 3)


def cal(machine: Machine, rows: dict[str, tuple[float, float]], model: str = "m" * 64) -> Calibration:
    measured = tuple(Measured(Config.parse(k), fig(a), fig(b)) for k, (a, b) in rows.items())
    skipped = Measured(Config("int4", "vllm"), skipped="vLLM's CPU backend has no int4")
    return Calibration(
        Key(machine, model, VERSIONS), "2026-12-07T10:00:00+00:00", 8, 32, 16, (*measured, skipped)
    )


@pytest.mark.parametrize(
    ("flags", "gpu", "precision", "engine"),
    [
        ("avx2 avx512f", "", "fp32", "vllm"),  # no native bf16
        ("avx2 avx512f avx512_bf16", "", "bf16", "hf"),
        ("avx2 amx_bf16 amx_tile", "", "bf16", "hf"),
        ("avx2", "NVIDIA H100", "bf16", "vllm"),  # CUDA
    ],
)
def test_auto_from_the_hardware(flags: str, gpu: str, precision: str, engine: str) -> None:
    choice = choose_auto(replace(cpu(flags), gpu=gpu))
    assert (choice.precision, choice.engine, choice.compile_decode) == (precision, engine, False)
    assert choice.reason.startswith(f"{precision} {engine}: ")
    why = {"fp32": "no native bf16"}.get(precision) or (f"cuda ({gpu})" if gpu else "cpu has ")
    assert why in choice.reason and "no calibration" in choice.reason


def test_fixed_flags_stay_fixed_without_calibration() -> None:
    amx = cpu("amx_bf16")
    fixed = choose_auto(amx, precision="fp32")
    assert fixed.engine == "vllm" and fixed.reason.startswith("fp32 vllm: --precision fp32; no calibration")
    assert choose_auto(amx, engine="vllm").precision == "bf16"
    assert choose_auto(amx, precision="int4").engine == "hf"  # vLLM's CPU backend has no int4
    assert choose_auto(amx, compiled=True).compile_decode is True  # bf16 hf, the flag asked for it
    assert choose_auto(cpu("avx2"), compiled=True).compile_decode is False  # fp32 vllm: no such path


def test_calibrated_best_at_c1_among_those_near_the_best_at_cmax() -> None:
    amx = cpu("amx_bf16")
    rows = {
        "fp32:vllm": (15.0, 90.0),
        "bf16:vllm": (20.0, 100.0),
        "bf16:hf": (28.0, 168.0),
        "bf16:hf:compiled": (33.0, 187.0),
        "int4:hf:compiled": (59.0, 174.0),  # fastest at c=1, but int4 costs quality: never auto
    }
    choice = choose_auto(amx, cal(amx, rows))
    assert (choice.precision, choice.engine, choice.compile_decode) == ("bf16", "hf", True)
    assert choice.reason == (
        "bf16 hf compiled: calibrated 33 tok/s at c=1 and 187 at c=8 against bf16 hf 28, 2026-12-07"
    )
    # the best c=1 loses when its c=max is under 0.9 x the best c=max
    rows["bf16:hf:compiled"] = (33.0, 150.0)  # 150 < 0.9 x 168
    assert choose_auto(amx, cal(amx, rows)).compile_decode is False  # bf16 hf: 28 at c=1, 168 at c=8
    # flags narrow what the calibration may pick; int4 when the flags ask for it
    assert choose_auto(amx, cal(amx, rows), engine="vllm").precision == "bf16"
    assert choose_auto(amx, cal(amx, rows), precision="fp32").engine == "vllm"
    assert choose_auto(amx, cal(amx, rows), precision="int4").compile_decode is True
    # nothing measured for what the flags fix: the hardware rule, said so
    fallback = choose_auto(amx, cal(amx, rows), precision="fp16")
    assert fallback.precision == "fp16" and "no figures" in fallback.reason


def test_storage_round_trip_and_only_an_exact_key_is_used(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("EFFLLM_CACHE", str(tmp_path))
    amx = cpu("amx_bf16 avx512_bf16")
    stored = cal(amx, {"fp32:vllm": (15.0, 90.0), "bf16:hf:compiled": (33.0, 187.0)})
    path = calibration.save(stored)
    assert path.parent == tmp_path / "calibration" and calibration.load(stored.key) == stored
    others = {
        "other CPU model": replace(stored.key, machine=replace(amx, cpu_model="Other Xeon")),
        "other CPU flags": replace(stored.key, machine=cpu("avx2")),
        "other core count": replace(stored.key, machine=replace(amx, cores=64)),
        "a GPU": replace(stored.key, machine=replace(amx, gpu="NVIDIA H100")),
        "other model": replace(stored.key, model="f" * 64),
        "other torch": replace(stored.key, versions=(("torch", "2.14.0"), *VERSIONS[1:])),
    }
    for what, key in others.items():
        assert calibration.load(key) is None, what
    # a file under the right name whose content was taken elsewhere is not used either
    path.write_text(path.read_text().replace("Fake Xeon", "Other Xeon"))
    assert calibration.load(stored.key) is None
    path.write_text("{not json")
    assert calibration.load(stored.key) is None


def test_config_specs() -> None:
    assert Config.parse("bf16:hf:compiled") == Config("bf16", "hf", True)
    assert {c.name for c in calibration.all_configs()} >= {"fp32:vllm", "int4:hf:compiled"}
    assert "int4:vllm:compiled" not in {c.name for c in calibration.all_configs()}
    for bad in ("bf16", "bf16:hf:fast", "fp8:hf", "bf16:vllm:compiled"):
        with pytest.raises(ValueError, match=r"bf16|fp8"):
            Config.parse(bad)
