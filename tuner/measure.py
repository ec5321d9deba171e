"""What a training run costs: memory, utilisation and energy over the run, from a background sampler.

`start_meter()` uses effllm.telemetry's `Measurement` (NVML / RAPL / CPU-time estimate with watts per core
resolved as everywhere, the sampler, the EfficientLLM formulas): one measurement library; the tuner sees only
`start_meter().stop() -> Usage`.
Invariant: energy carries its source; with no hardware counter readable it is `estimated` (process CPU time
x watts per core) and is never reported as measured.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any


@dataclass(frozen=True)
class Usage:
    duration_s: float
    peak_memory_gb: float  # process RSS (+ CUDA peak when on a GPU)
    amu_gb: float  # EfficientLLM AMU for training: time-averaged memory in use, GB
    pcu: float  # EfficientLLM PCU: time-averaged utilisation of the compute in use, 0..1
    energy_j: float
    mean_power_w: float  # EfficientLLM AEC: average power
    energy_source: str  # "estimated" | "measured-rapl" | "measured-nvml"
    samples: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class TelemetryMeter:
    """effllm.telemetry.sampler.Measurement behind the same start/stop -> Usage interface."""

    def __init__(self, measurement_cls: Any) -> None:
        self._m = measurement_cls(hz=2.0)

    def start(self) -> TelemetryMeter:
        self._m.__enter__()
        return self

    def stop(self) -> Usage:
        self._m.__exit__(None, None, None)
        s = self._m.summary
        return Usage(
            duration_s=s.duration_s,
            peak_memory_gb=s.peak_memory_bytes / 1e9,
            amu_gb=s.amu_bytes / 1e9,
            pcu=s.pcu,
            energy_j=s.energy_j,
            mean_power_w=s.aec_w,
            energy_source=str(s.energy_source),
            samples=s.samples,
        )


def start_meter() -> TelemetryMeter:
    from ..telemetry.sampler import Measurement

    return TelemetryMeter(Measurement).start()
