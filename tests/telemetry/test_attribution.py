"""The equal-time-share rule, driven by a real RAPL meter reading a powercap file we advance by hand."""

from __future__ import annotations

from pathlib import Path

import pytest

from effllm.telemetry.attribution import EnergyAttributor
from effllm.telemetry.energy import RaplMeter


class Counter:
    def __init__(self, root: Path) -> None:
        zone = root / "intel-rapl:0"
        zone.mkdir()
        (zone / "max_energy_range_uj").write_text("1000000000000\n")
        self.file = zone / "energy_uj"
        self.joules = 0.0
        self.set(0.0)

    def set(self, joules: float) -> None:
        self.joules = joules
        self.file.write_text(f"{round(joules * 1e6)}\n")


def test_overlapping_requests_share_each_interval_equally(tmp_path: Path) -> None:
    c = Counter(tmp_path)
    att = EnergyAttributor(RaplMeter(tmp_path))
    c.set(5.0)  # idle: nobody runs
    att.start("a")
    c.set(15.0)  # a alone: +10 -> a 10
    att.start("b")
    c.set(35.0)  # a and b: +20 -> 10 each
    a = att.finish("a")
    c.set(41.0)  # b alone: +6
    b = att.finish("b")
    c.set(50.0)  # idle again
    att.start("c")
    assert a.joules == pytest.approx(20.0)
    assert b.joules == pytest.approx(16.0)
    assert a.source == "measured-rapl"
    assert att.idle_j == pytest.approx(5.0 + 9.0)
    assert att.attributed_j + att.idle_j == pytest.approx(50.0)  # nothing lost, nothing double counted
    assert att.running() == 1


def test_unknown_request_gets_nothing(tmp_path: Path) -> None:
    Counter(tmp_path)
    att = EnergyAttributor(RaplMeter(tmp_path))
    assert att.finish("never-started").joules == 0.0
