"""The EfficientLLM formulas on inputs small enough to compute by hand."""

from __future__ import annotations

import math

import pytest

from effllm.telemetry import metrics as m


def test_time_average_trapezoid_by_hand() -> None:
    # x = 0 on [0,1] rising to 2 at t=2, then flat 2 until t=4: area = 0 + (0+2)/2*1 + 2*2 = 5, T = 4
    series = [(0.0, 0.0), (1.0, 0.0), (2.0, 2.0), (4.0, 2.0)]
    assert m.time_average(series) == pytest.approx(5 / 4)


def test_time_average_uneven_sampling_is_time_weighted_not_a_plain_mean() -> None:
    series = [(0.0, 1.0), (9.0, 1.0), (10.0, 11.0)]  # plain mean 13/3; time average (9 + 6) / 10
    assert m.time_average(series) == pytest.approx(1.5)


def test_time_average_edges() -> None:
    assert m.time_average([(3.0, 7.0)]) == 7.0
    assert m.time_average([(1.0, 2.0), (1.0, 4.0)]) == 3.0
    with pytest.raises(ValueError):
        m.time_average([])
    with pytest.raises(ValueError):
        m.time_average([(2.0, 1.0), (1.0, 1.0)])


def test_amu_ratio_and_bytes() -> None:
    used = [(0.0, 2.0), (1.0, 4.0), (2.0, 6.0)]  # mean used 4
    assert m.amu(used, total=8.0) == pytest.approx(0.5)
    assert m.amu(used) == pytest.approx(4.0)
    with pytest.raises(ValueError):
        m.amu(used, total=0)


def test_pcu_is_a_time_average_over_peak() -> None:
    util_pct = [(0.0, 100.0), (1.0, 0.0), (2.0, 100.0)]  # NVML percent: (50 + 50) / 2 / 100
    assert m.pcu(util_pct, peak=100.0) == pytest.approx(0.5)


def test_latency_and_throughputs() -> None:
    lat = [1.0, 2.0, 3.0]
    toks = [10, 20, 30]
    assert m.average_latency(lat) == 2.0
    assert m.inference_throughput(toks, lat) == pytest.approx(60 / 6)  # Σ tokens / Σ latencies
    assert m.wall_throughput(60, 3.0) == 20.0  # the same requests run concurrently in 3 s
    # TT: Σ(tokens/params)/Σ time with 1000 params: (0.01 + 0.02 + 0.03) / 6
    assert m.per_parameter_throughput(toks, 1000, lat) == pytest.approx(0.06 / 6)
    with pytest.raises(ValueError):
        m.inference_throughput([1], [1.0, 2.0])
    with pytest.raises(ValueError):
        m.per_parameter_throughput(toks, 0, lat)


def test_aec_energy_and_j_per_token() -> None:
    power = [(0.0, 100.0), (2.0, 300.0)]  # mean 200 W over 2 s
    assert m.aec(power) == pytest.approx(200.0)
    assert m.energy_from_power(power) == pytest.approx(400.0)
    assert m.joules_per_token(400.0, 100) == pytest.approx(4.0)
    assert math.isnan(m.joules_per_token(5.0, 0))


def test_mcr_int4_example() -> None:
    # bf16 -> int4: 4x smaller, quality 0.60 -> 0.57 (5 % drop): MCR = 4 * 0.95
    assert m.mcr(2.0, 0.5, 0.60, 0.57) == pytest.approx(3.8)
    with pytest.raises(ValueError):
        m.mcr(1.0, 0.0, 1.0, 1.0)


def test_percentile_matches_linear_interpolation() -> None:
    values = [4.0, 1.0, 3.0, 2.0]  # sorted 1 2 3 4
    assert m.percentile(values, 50) == pytest.approx(2.5)
    assert m.percentile(values, 90) == pytest.approx(3.7)  # pos 2.7
    assert m.percentile(values, 0) == 1.0 and m.percentile(values, 100) == 4.0
    assert math.isnan(m.percentile([], 50))
