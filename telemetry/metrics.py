"""The EfficientLLM metrics (Yuan et al., 2025) as pure functions, plus what effllm adds (J, J/token).

Definitions follow the paper (arXiv 2505.13840) and its authors' measurement code exactly:
  AMU = (1/T) ∫ memory_used(t) dt      (ratio used/total for inference; bytes for training)
  PCU = (1/T) ∫ utilisation(t)/peak dt (a time average in 0..1, despite the word "peak")
  AL  = Σ latency_i / N
  AT  = IT = Σ generated tokens / Σ request latencies (inference); TT/ST per parameter (training)
  AEC = (1/T) ∫ P(t) dt                (mean power, W)
  MCR = (size_orig / size_comp) × (perf_comp / perf_orig)
Invariant: no function here reads a clock, a file or a device; every input is explicit, so each is
testable on hand-computed numbers. Time averages integrate with the trapezoid rule over (t, value)
samples, which equals the authors' "mean of samples" for evenly spaced samples up to the two end halves.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from itertools import pairwise

Series = Sequence[tuple[float, float]]  # (t in seconds, value), t non-decreasing


def time_average(series: Series) -> float:
    """(1/T) ∫ x(t) dt by the trapezoid rule; one sample (or T = 0) gives that sample's mean value."""
    if not series:
        raise ValueError("time_average: no samples")
    if len(series) == 1:
        return float(series[0][1])
    t0, tn = series[0][0], series[-1][0]
    if tn < t0:
        raise ValueError("time_average: timestamps go backwards")
    if tn == t0:
        return sum(v for _, v in series) / len(series)
    area = 0.0
    for (ta, va), (tb, vb) in pairwise(series):
        if tb < ta:
            raise ValueError("time_average: timestamps go backwards")
        area += (tb - ta) * (va + vb) / 2.0
    return area / (tn - t0)


def amu(used: Series, total: float | None = None) -> float:
    """Average memory utilisation: a used/total ratio when `total` is given (inference), else the mean
    of `used` in its own unit (the training variant, e.g. bytes)."""
    if total is not None:
        if total <= 0:
            raise ValueError("amu: total must be > 0")
        return time_average([(t, u / total) for t, u in used])
    return time_average(used)


def pcu(utilisation: Series, peak: float = 1.0) -> float:
    """Time-averaged utilisation / peak, in 0..1 when utilisation <= peak (NVML % uses peak=100)."""
    if peak <= 0:
        raise ValueError("pcu: peak must be > 0")
    return time_average([(t, u / peak) for t, u in utilisation])


def average_latency(latencies_s: Sequence[float]) -> float:
    """AL: Σ latency / N (seconds per request or per step)."""
    if not latencies_s:
        raise ValueError("average_latency: no requests")
    return sum(latencies_s) / len(latencies_s)


def inference_throughput(generated_tokens: Sequence[int], latencies_s: Sequence[float]) -> float:
    """The paper's IT: Σ generated tokens / Σ request latencies (tokens/s). Under concurrency this is the
    per-request decode speed, not the server's capacity; see `wall_throughput` for that."""
    if len(generated_tokens) != len(latencies_s):
        raise ValueError("inference_throughput: one latency per request")
    total = sum(latencies_s)
    if total <= 0:
        raise ValueError("inference_throughput: the latencies sum to 0")
    return sum(generated_tokens) / total


def wall_throughput(generated_tokens: int, wall_s: float) -> float:
    """Tokens / wall-clock seconds over a window: what load-test users (and vLLM's bench) call tokens/s."""
    if wall_s <= 0:
        raise ValueError("wall_throughput: wall_s must be > 0")
    return generated_tokens / wall_s


def per_parameter_throughput(amounts: Sequence[float], parameters: int, times_s: Sequence[float]) -> float:
    """TT (amounts = tokens) or ST (amounts = samples): Σ(amount/params) / Σ time, in 1/param/s.
    For inference, IT / params is the same with amounts = generated tokens and times = latencies."""
    if parameters <= 0:
        raise ValueError("per_parameter_throughput: parameters must be > 0")
    if len(amounts) != len(times_s):
        raise ValueError("per_parameter_throughput: one time per amount")
    total = sum(times_s)
    if total <= 0:
        raise ValueError("per_parameter_throughput: the times sum to 0")
    return sum(a / parameters for a in amounts) / total


def aec(power_w: Series) -> float:
    """AEC: time-averaged power draw in W (the paper's "energy consumption" is a mean power)."""
    return time_average(power_w)


def mcr(size_original: float, size_compressed: float, perf_original: float, perf_compressed: float) -> float:
    """Model compression rate: (size_orig / size_comp) × (perf_comp / perf_orig)."""
    if size_compressed <= 0 or perf_original <= 0:
        raise ValueError("mcr: size_compressed and perf_original must be > 0")
    return (size_original / size_compressed) * (perf_compressed / perf_original)


def energy_from_power(power_w: Series) -> float:
    """∫ P dt in J by the trapezoid rule (for meters that only give power)."""
    if len(power_w) < 2:
        return 0.0
    return time_average(power_w) * (power_w[-1][0] - power_w[0][0])


def joules_per_token(energy_j: float, output_tokens: int) -> float:
    """J per output token; NaN when nothing was generated (there is no per-token figure then)."""
    if energy_j < 0:
        raise ValueError("joules_per_token: energy must be >= 0")
    return energy_j / output_tokens if output_tokens > 0 else math.nan


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0..100) with linear interpolation between closest ranks (numpy's default)."""
    if not values:
        return math.nan
    if not 0 <= q <= 100:
        raise ValueError("percentile: q must be in 0..100")
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q / 100.0
    lo = math.floor(pos)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)
