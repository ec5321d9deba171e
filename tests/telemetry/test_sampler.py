"""The sampler thread and the Measurement window on this machine (CPU path), plus summarize by hand."""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import random
import time
from dataclasses import replace
from pathlib import Path

import pytest

from effllm.telemetry.sampler import (
    Measurement,
    ResourceSampler,
    Sample,
    SampleIndex,
    read_samples,
    summarize,
)


def _sample(t: float, mem: float, util: float, power: float, energy: float) -> Sample:
    return Sample(
        t=t,
        memory_utilisation=mem,
        utilisation=util,
        power_w=power,
        energy_j=energy,
        energy_source="estimated",
        rss_bytes=int(mem * 1000),
        system_memory_used_bytes=0,
        system_memory_total_bytes=1000,
        cpu_utilisation=util,
    )


def test_summarize_by_hand() -> None:
    samples = [
        _sample(0, 0.2, 0.0, 10, 0),
        _sample(1, 0.4, 1.0, 30, 20),
        _sample(2, 0.4, 1.0, 30, 50),
        _sample(9, 0.9, 0.0, 0, 60),
    ]
    w = summarize(samples, start=0, end=2)
    assert w.samples == 3
    assert w.amu == pytest.approx((0.3 + 0.4) / 2)
    assert w.pcu == pytest.approx((0.5 + 1.0) / 2)
    assert w.aec_w == pytest.approx((20 + 30) / 2)
    assert w.energy_j == 50
    assert w.peak_memory_bytes == 400
    assert w.energy_source == "estimated" and w.device == "cpu"
    with pytest.raises(ValueError):
        summarize(samples, start=3, end=4)


def test_sampler_records_at_its_rate_and_writes_what_it_keeps(tmp_path: Path) -> None:
    path = tmp_path / "samples.jsonl"
    sampler = ResourceSampler(20.0, path=path).start()
    cpu0, wall0 = time.process_time(), time.monotonic()
    end = wall0 + 0.6
    block = bytes(1 << 20)
    # Keep a core busy so utilisation and power are > 0, in C with the GIL released (hashlib does for
    # large buffers): a pure-Python spin loop would hold the GIL the sampler thread needs for each of its
    # psutil calls, and any Python thread next to it runs at a fraction of its rate.
    while time.monotonic() < end:
        hashlib.sha256(block).digest()
    sampler.stop()
    # What the process really got (a loaded machine may give the spinning loop far less than a core).
    expected_pcu = (time.process_time() - cpu0) / (time.monotonic() - wall0) / (os.cpu_count() or 1)
    n = len(sampler.samples)
    # 0.6 s at 20 Hz + the first and last sample (14), with slack for a loaded machine (samples are
    # scheduled by deadline: a late one does not delay the next)
    assert 8 <= n <= 16
    on_disk = read_samples(path)
    assert on_disk == sampler.samples
    assert all(json.loads(line)["energy_source"] == "estimated" for line in path.read_text().splitlines())
    ts = [s.t for s in on_disk]
    assert ts == sorted(ts)
    busy = summarize(on_disk)
    assert busy.pcu > 0.5 * expected_pcu > 0  # the sampler saw the spinning core's share
    assert busy.aec_w > 0 and busy.energy_j > 0
    assert 0 < busy.amu < 1 and busy.peak_memory_bytes > 10 << 20


class _SlowSampler(ResourceSampler):
    """Each sample takes 40 ms (a stand-in for a late wake-up or a slow /proc read; the sleep releases the
    GIL, so only the schedule is under test)."""

    def sample(self) -> Sample:
        time.sleep(0.04)
        return super().sample()


def test_sampler_keeps_its_rate_when_samples_are_slow() -> None:
    """Scheduled by deadline: 40 ms samples at 20 Hz still give a sample every 50 ms (sleeping a period
    after each sample would give one every 90 ms: about 9 in the window instead of 14)."""
    sampler = _SlowSampler(20.0).start()
    time.sleep(0.6)
    sampler.stop()
    ts = [s.t for s in sampler.samples]
    assert len(ts) >= 11, [round(b - a, 3) for a, b in itertools.pairwise(ts)]
    assert len(ts) <= 16  # missed slots are skipped, not made up in a burst


def test_measurement_window_api() -> None:
    with Measurement(hz=20.0) as m:
        t0 = time.process_time()
        while time.process_time() - t0 < 0.3:
            pass
        inside = m.summary
    s = m.summary
    assert inside.samples <= s.samples
    assert s.energy_source == "estimated"
    assert s.duration_s >= 0.25  # 0.3 s of work, seen between samples 50 ms apart
    assert s.energy_j > 0
    # the estimate is CPU seconds x watts per core (default 10 W): at least the 0.3 s we spun
    assert s.energy_j >= 0.3 * 10 * 0.8
    assert m.joules_per_token(100) == pytest.approx(s.energy_j / 100)


def test_sample_index_equals_summarize_on_any_window_and_after_dropping_blocks() -> None:
    """The prefix integrals give summarize's numbers (trapezoid rule) for any window, peak memory included,
    and stay right once the oldest blocks are dropped (the sampler's bounded history)."""
    rng = random.Random(7)
    samples, t = [], 0.0
    for i in range(3 * SampleIndex.BLOCK + 100):
        t += rng.uniform(0.05, 0.2)
        samples.append(_sample(t, rng.random(), rng.random(), rng.uniform(5, 50), 3.0 * i))
    index = SampleIndex(samples)
    for _ in range(60):
        a, b = sorted(rng.uniform(-1, t + 1) for _ in range(2))
        picked = [s for s in samples if a <= s.t <= b]
        got = index.summary(a, b)
        if not picked:
            assert got is None
            continue
        want = summarize(picked)
        assert got is not None and (got.samples, got.peak_memory_bytes) == (
            want.samples,
            want.peak_memory_bytes,
        )
        for field in ("amu", "amu_bytes", "pcu", "aec_w", "energy_j", "start", "end"):
            assert getattr(got, field) == pytest.approx(getattr(want, field), rel=1e-9, abs=1e-9), field
    one = samples[5]
    assert index.summary(one.t, one.t) == summarize([one])
    index.drop_oldest_block()
    kept = samples[SampleIndex.BLOCK :]
    assert index.samples == kept and index.between() == kept
    got, want = index.summary(), summarize(kept)
    assert got is not None and got.peak_memory_bytes == want.peak_memory_bytes
    assert got.amu == pytest.approx(want.amu) and got.aec_w == pytest.approx(want.aec_w)
    mixed = SampleIndex([samples[0], replace(samples[1], energy_source="measured(rapl)")])
    assert mixed.summary() is None and mixed.summary(end=samples[0].t) is not None


def test_sampler_history_is_bounded() -> None:
    sampler = ResourceSampler(10.0, max_samples=SampleIndex.BLOCK)
    for _ in range(3 * SampleIndex.BLOCK):
        sampler.sample()
    assert SampleIndex.BLOCK <= len(sampler.samples) <= 2 * SampleIndex.BLOCK
    assert sampler.count_between() == len(sampler.samples)
    sampler.meter.close()
