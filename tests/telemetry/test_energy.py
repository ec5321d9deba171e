"""Energy meters: the estimate here, RAPL on a powercap tree laid out as the kernel does, NVML on GPUs."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from effllm.telemetry.energy import (
    CpuTimeEstimateMeter,
    EnergyReading,
    NvmlMeter,
    RaplMeter,
    resolve_watts_per_core,
    select_meter,
)
from effllm.telemetry.nvml import open_gpus


def _spin(seconds: float) -> None:
    end = time.process_time() + seconds
    while time.process_time() < end:
        pass


def test_reading_refuses_an_unknown_source() -> None:
    with pytest.raises(ValueError):
        EnergyReading(1.0, 0.0, "measured")  # type: ignore[arg-type]


def test_estimate_is_cpu_time_times_watts_and_says_estimated() -> None:
    meter = CpuTimeEstimateMeter(watts_per_core=20.0)
    before = meter.read()
    cpu0 = time.process_time()
    _spin(0.3)
    spent = time.process_time() - cpu0
    after = meter.read()
    assert before.source == after.source == "estimated"
    # this process's CPU time x 20 W (children, if any, only add)
    assert after.joules - before.joules == pytest.approx(spent * 20.0, rel=0.25)


def test_watts_per_core_from_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EFFLLM_WATTS_PER_CORE", "7.5")
    assert resolve_watts_per_core() == 7.5
    assert resolve_watts_per_core(3.0) == 3.0  # a flag beats the variable
    monkeypatch.setenv("EFFLLM_WATTS_PER_CORE", "lots")
    with pytest.raises(ValueError, match="EFFLLM_WATTS_PER_CORE"):
        resolve_watts_per_core()
    with pytest.raises(ValueError):
        resolve_watts_per_core(0.0)


def _zone(root: Path, name: str, energy_uj: int, max_uj: int) -> Path:
    z = root / name
    z.mkdir(parents=True)
    (z / "energy_uj").write_text(f"{energy_uj}\n")
    (z / "max_energy_range_uj").write_text(f"{max_uj}\n")
    return z


def test_rapl_sums_packages_skips_subzones_and_handles_wraparound(tmp_path: Path) -> None:
    p0 = _zone(tmp_path, "intel-rapl:0", 900, 1000)
    p1 = _zone(tmp_path, "intel-rapl:1", 100, 1000)
    _zone(tmp_path, "intel-rapl:0:0", 50, 1000)  # a core sub-zone: already inside package 0
    meter = RaplMeter(tmp_path)
    assert meter.read().joules == 0.0
    (p0 / "energy_uj").write_text("100\n")  # wrapped: 900 -> 1000 -> 0 -> 100 = 201 µJ
    (p1 / "energy_uj").write_text("400\n")  # +300 µJ
    r = meter.read()
    assert r.source == "measured-rapl"
    assert r.joules == pytest.approx(501e-6)


def test_rapl_unreadable_raises_so_selection_falls_through(tmp_path: Path) -> None:
    with pytest.raises(OSError):
        RaplMeter(tmp_path)
    assert select_meter(rapl_root=tmp_path).source in ("measured-nvml", "estimated")


def test_selection_prefers_rapl_when_readable_and_no_gpu(tmp_path: Path) -> None:
    if open_gpus() is not None:
        pytest.skip("a GPU is visible: NVML wins")
    _zone(tmp_path, "intel-rapl:0", 5, 1000)
    assert isinstance(select_meter(rapl_root=tmp_path), RaplMeter)
    assert isinstance(select_meter("estimate", rapl_root=tmp_path), CpuTimeEstimateMeter)


def test_no_gpu_here_falls_through_to_the_estimate_cleanly() -> None:
    if open_gpus() is not None:
        pytest.skip("a GPU is visible")
    meter = select_meter()  # pynvml is installed but finds no driver/GPU; no RAPL readable here
    if Path("/sys/class/powercap/intel-rapl:0/energy_uj").exists() and os.access(
        "/sys/class/powercap/intel-rapl:0/energy_uj", os.R_OK
    ):
        assert meter.source == "measured-rapl"
    else:
        assert meter.source == "estimated"
        assert isinstance(meter, CpuTimeEstimateMeter)
    assert select_meter("nvml").source != "measured-nvml"  # asked for NVML, none here: falls through


@pytest.mark.gpu
def test_nvml_is_selected_when_pynvml_reports_a_gpu() -> None:
    gpus = open_gpus()
    if gpus is None:
        pytest.skip("no NVIDIA GPU visible to NVML")
    gpus.close()
    meter = select_meter()
    try:
        assert isinstance(meter, NvmlMeter)
        first = meter.read()
        time.sleep(0.5)
        second = meter.read()
        assert first.source == second.source == "measured-nvml"
        assert second.joules >= first.joules  # an idle GPU still draws power: the counter moves
    finally:
        meter.close()
