"""The attribution rule: an interval's energy is split equally among the busy engines (groups), then equally
among each one's running requests. Pinned numbers drive a real RAPL meter reading a powercap file we advance
by hand; the random sequences use a hand-advanced fake meter (exact floats, microseconds)."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from effllm.telemetry.attribution import EnergyAttributor
from effllm.telemetry.energy import EnergyReading, RaplMeter, Source


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


class HandMeter:
    """An EnergyMeter whose cumulative joules we set by hand."""

    source: Source = "estimated"

    def __init__(self) -> None:
        self.joules = 0.0

    def read(self) -> EnergyReading:
        return EnergyReading(self.joules, 0.0, self.source)

    def close(self) -> None:
        pass


@pytest.mark.parametrize("group", ["", "fp32:vllm"])
def test_one_engine_splits_each_interval_equally_among_its_requests(tmp_path: Path, group: str) -> None:
    c = Counter(tmp_path)
    att = EnergyAttributor(RaplMeter(tmp_path))
    c.set(5.0)  # idle: nobody runs
    att.start("a", group)
    c.set(15.0)  # a alone: +10 -> a 10
    att.start("b", group)
    c.set(35.0)  # a and b: +20 -> 10 each
    a = att.finish("a", group)
    c.set(41.0)  # b alone: +6
    b = att.finish("b", group)
    c.set(50.0)  # idle again
    att.start("c", group)
    assert a.joules == pytest.approx(20.0)
    assert b.joules == pytest.approx(16.0)
    assert a.source == "measured-rapl"
    assert att.idle_j == pytest.approx(5.0 + 9.0)
    assert att.attributed_j + att.idle_j == pytest.approx(50.0)  # nothing lost, nothing double counted
    assert att.running() == 1 and att.running(group) == 1 and att.busy_groups() == (group,)


def test_two_engines_take_half_each_whatever_their_batch_sizes(tmp_path: Path) -> None:
    c = Counter(tmp_path)
    att = EnergyAttributor(RaplMeter(tmp_path))
    fp32 = [f"f{i}" for i in range(8)]
    int4 = ["i0", "i1"]
    for rid in fp32:
        att.start(rid, "fp32:hf")
    for rid in int4:
        att.start(rid, "int4:hf")
    assert att.running() == 10 and att.running("fp32:hf") == 8 and att.running("int4:hf") == 2
    c.set(100.0)  # one interval, both engines busy: 50 J each
    got = {rid: att.finish(rid, "fp32:hf").joules for rid in fp32}
    got |= {rid: att.finish(rid, "int4:hf").joules for rid in int4}
    # the equal-per-request rule would give every request 10 J
    assert all(got[rid] == pytest.approx(50.0 / 8) for rid in fp32)
    assert all(got[rid] == pytest.approx(50.0 / 2) for rid in int4)
    assert sum(got.values()) == pytest.approx(100.0) and att.idle_j == 0.0


def test_an_engine_that_goes_idle_stops_taking_a_share(tmp_path: Path) -> None:
    c = Counter(tmp_path)
    att = EnergyAttributor(RaplMeter(tmp_path))
    att.start("f0", "fp32:hf")
    att.start("f1", "fp32:hf")
    att.start("i0", "int4:hf")
    c.set(12.0)  # both busy: fp32 6 (3 each), int4 6
    i0 = att.finish("i0", "int4:hf")
    assert att.busy_groups() == ("fp32:hf",)
    c.set(20.0)  # fp32 alone: +8 -> 4 each
    f0 = att.finish("f0", "fp32:hf")
    f1 = att.finish("f1", "fp32:hf")
    c.set(23.0)  # nothing runs: idle
    att.start("f2", "fp32:hf")
    assert i0.joules == pytest.approx(6.0)
    assert f0.joules == pytest.approx(7.0) and f1.joules == pytest.approx(7.0)
    assert att.idle_j == pytest.approx(3.0)
    assert att.attributed_j + att.idle_j == pytest.approx(23.0)


def test_unknown_request_gets_nothing(tmp_path: Path) -> None:
    Counter(tmp_path)
    att = EnergyAttributor(RaplMeter(tmp_path))
    assert att.finish("never-started").joules == 0.0
    att.start("a", "fp32:hf")
    assert att.finish("a", "int4:hf").joules == 0.0  # not running on that engine
    assert att.running("fp32:hf") == 1


def test_one_request_id_on_two_engines_is_two_requests() -> None:
    meter = HandMeter()
    att = EnergyAttributor(meter)
    att.start("same", "fp32:hf")
    att.start("same", "int4:hf")  # each runner refuses duplicates among its own requests only
    att.start("same", "int4:hf")  # already running: it keeps running and keeps what it accrued
    meter.joules = 10.0
    assert att.finish("same", "fp32:hf").joules == pytest.approx(5.0)
    meter.joules = 14.0
    assert att.finish("same", "int4:hf").joules == pytest.approx(9.0)
    assert att.attributed_j + att.idle_j == pytest.approx(14.0)


def _random_run(rng: random.Random, groups: list[str], steps: int) -> tuple[HandMeter, EnergyAttributor]:
    """Random starts and finishes with random energy in between; returns the meter and attributor after
    every request finished, checking each returned share against a reference model of the rule."""
    meter = HandMeter()
    att = EnergyAttributor(meter)
    running: dict[tuple[str, str], float] = {}  # (group, id) -> J by the reference model
    returned, last = 0.0, 0.0
    for step in range(steps):
        meter.joules += rng.choice((0.0, rng.uniform(0.0, 5.0), rng.uniform(0.0, 500.0)))
        delta, last = meter.joules - last, meter.joules  # as the attributor sees it between two reads
        busy = sorted({g for g, _ in running})
        for key in running:
            count = sum(1 for g, _ in running if g == key[0])
            running[key] += delta / len(busy) / count
        if running and (rng.random() < 0.55 or len(running) > 12):
            key = rng.choice(sorted(running))
            got = att.finish(key[1], key[0]).joules
            assert got == pytest.approx(running.pop(key), rel=1e-9, abs=1e-9)
            returned += got
        else:
            group = rng.choice(groups)
            running[(group, f"r{step}")] = 0.0
            att.start(f"r{step}", group)
        assert att.running() == len(running)
    meter.joules += 7.0  # the last interval's energy goes to whoever still runs, then all finish
    delta = meter.joules - last
    busy = sorted({g for g, _ in running})
    for key in sorted(running):
        count = sum(1 for g, _ in running if g == key[0])
        expected = running[key] + delta / len(busy) / count
        got = att.finish(key[1], key[0]).joules
        assert got == pytest.approx(expected, rel=1e-9, abs=1e-9)
        returned += got
    assert att.running() == 0 and att.busy_groups() == ()
    assert returned == pytest.approx(att.attributed_j, rel=1e-12)
    return meter, att


@pytest.mark.parametrize("groups", [["fp32:hf"], ["fp32:hf", "int4:hf"], ["bf16:vllm", "int4:hf", "fp32:hf"]])
def test_attributed_plus_idle_is_the_meters_total_over_a_random_run(groups: list[str]) -> None:
    meter, att = _random_run(random.Random(0), groups, 2000)
    assert att.idle_j > 0 and att.attributed_j > 0  # the run had idle and busy intervals
    assert att.attributed_j + att.idle_j == pytest.approx(meter.joules, rel=1e-9)


def test_with_one_engine_every_share_is_exactly_the_old_equal_share() -> None:
    """The old rule, ΔE / n per running request, bit for bit (same floats), over a random run."""
    rng = random.Random(0)
    meter = HandMeter()
    att = EnergyAttributor(meter)
    old: dict[str, float] = {}
    last = 0.0
    for step in range(1000):
        meter.joules += rng.uniform(0.0, 3.0)
        delta, last = meter.joules - last, meter.joules  # as the attributor sees it between two reads
        share = delta / len(old) if old else 0.0
        for rid in old:
            old[rid] += share
        if old and rng.random() < 0.5:
            rid = rng.choice(sorted(old))
            assert att.finish(rid, "fp32:vllm").joules == old.pop(rid)  # exact, not approx
        else:
            old[f"r{step}"] = 0.0
            att.start(f"r{step}", "fp32:vllm")


def test_nothing_running_is_all_idle() -> None:
    meter = HandMeter()
    att = EnergyAttributor(meter)
    meter.joules = 4.0
    assert att.finish("nobody", "fp32:hf").joules == 0.0
    meter.joules = 9.5
    att.start("a", "fp32:hf")  # the reading at start closes the idle interval
    assert att.idle_j == pytest.approx(9.5) and att.attributed_j == 0.0
