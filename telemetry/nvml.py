"""NVIDIA GPUs through NVML (pynvml from nvidia-ml-py): open once, read memory, utilisation, power, energy.

Invariant: `open_gpus()` returns None (never raises) when pynvml is missing, the driver is absent or no
GPU is visible, so every caller falls through to the CPU path cleanly. Units are converted here once:
bytes, 0..1 utilisation, W and J.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
from dataclasses import dataclass
from typing import Any

log = logging.getLogger(__name__)

_lock = threading.Lock()
_refs = 0


@dataclass(frozen=True)
class GpuSnapshot:
    memory_used_bytes: int
    memory_total_bytes: int
    utilisation: float  # 0..1, mean over the GPUs
    power_w: float  # summed over the GPUs


class Gpus:
    """The GPUs this process may use (CUDA_VISIBLE_DEVICES when it holds indices, else all)."""

    def __init__(self, pynvml: Any, handles: list[Any]) -> None:
        self.nvml = pynvml
        self.handles = handles
        self.names = [_text(pynvml.nvmlDeviceGetName(h)) for h in handles]

    def __len__(self) -> int:
        return len(self.handles)

    def snapshot(self) -> GpuSnapshot:
        used = total = 0
        util = power = 0.0
        for h in self.handles:
            mem = self.nvml.nvmlDeviceGetMemoryInfo(h)
            used += int(mem.used)
            total += int(mem.total)
            util += float(self.nvml.nvmlDeviceGetUtilizationRates(h).gpu) / 100.0
            power += self.power_w(h)
        return GpuSnapshot(used, total, util / len(self.handles), power)

    def power_w(self, handle: Any) -> float:
        try:
            return float(self.nvml.nvmlDeviceGetPowerUsage(handle)) / 1000.0  # mW -> W
        except self.nvml.NVMLError:
            return 0.0

    def total_energy_j(self, handle: Any) -> float:
        """The driver's energy counter since it loaded (Volta and newer); raises NVMLError elsewhere."""
        return float(self.nvml.nvmlDeviceGetTotalEnergyConsumption(handle)) / 1000.0  # mJ -> J

    def close(self) -> None:
        global _refs
        with _lock:
            if self.handles:
                self.handles = []
                _refs -= 1
                if _refs == 0:
                    with contextlib.suppress(self.nvml.NVMLError):
                        self.nvml.nvmlShutdown()


def open_gpus() -> Gpus | None:
    """Initialise NVML and return the visible GPUs, or None where there are none (or no pynvml)."""
    global _refs
    try:
        import pynvml
    except ImportError:
        return None
    with _lock:
        try:
            pynvml.nvmlInit()
        except pynvml.NVMLError as err:  # no driver / library: the common case on CPU machines
            log.debug("NVML unavailable: %s", err)
            return None
        try:
            count = int(pynvml.nvmlDeviceGetCount())
            indices = _visible(count)
            handles = [pynvml.nvmlDeviceGetHandleByIndex(i) for i in indices]
        except pynvml.NVMLError as err:
            log.debug("NVML device query failed: %s", err)
            handles = []
        if not handles:
            pynvml.nvmlShutdown()
            return None
        _refs += 1
    return Gpus(pynvml, handles)


def _visible(count: int) -> list[int]:
    raw = os.environ.get("CUDA_VISIBLE_DEVICES")
    if raw is None or not raw.strip():
        return list(range(count)) if raw is None else []
    picked: list[int] = []
    for part in raw.split(","):
        part = part.strip()
        if not part.isdigit():  # UUIDs / MIG ids: we cannot map them cheaply, so take every GPU
            return list(range(count))
        if int(part) < count:
            picked.append(int(part))
    return picked


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value
