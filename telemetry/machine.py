"""The machine a figure was measured on: CPU model and the flags that decide precision, core count, GPU.

One home for "what is this machine" (benchmarks, the tuner's autocast, the server's `auto` precision and
its calibration key all read it here). `parse_cpuinfo` is pure, so the rules above it are tested over fake
flag sets; `machine()` reads /proc/cpuinfo (and, asked for CUDA, torch) once per process.
Invariant: `Machine` holds only what identifies the hardware (no load, no time): two calls on the same
machine give equal values, so it can key a stored measurement.
"""

from __future__ import annotations

import os
import platform
from dataclasses import asdict, dataclass
from functools import cache
from pathlib import Path
from typing import Any

# CPU flags that change which precision is fast: native bf16 (AVX512-BF16, AMX-BF16), int8 dot products
# (AVX512-VNNI, AVX-VNNI, AMX-INT8), and the vector width under them.
RELEVANT_FLAGS = (
    "avx2",
    "avx512f",
    "avx512_vnni",
    "avx_vnni",
    "avx512_bf16",
    "amx_bf16",
    "amx_int8",
    "amx_tile",
)
BF16_FLAGS = ("avx512_bf16", "amx_bf16")


@dataclass(frozen=True)
class Machine:
    cpu_model: str
    cpu_flags: tuple[str, ...]  # the RELEVANT_FLAGS this CPU has, in that order
    cores: int  # logical CPUs the OS reports
    gpu: str = ""  # CUDA device 0's name when the server runs on CUDA, else ""

    @property
    def cpu_bf16(self) -> str:
        """The first native-bf16 flag this CPU has ("" if none): `amx_bf16` before `avx512_bf16`."""
        return next((f for f in reversed(BF16_FLAGS) if f in self.cpu_flags), "")

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["cpu_flags"] = list(self.cpu_flags)
        return d

    def describe(self) -> str:
        flags = ", ".join(self.cpu_flags) or "no bf16/int8 flags"
        gpu = f"; GPU {self.gpu}" if self.gpu else ""
        return f"{self.cpu_model} ({flags}), {self.cores} CPUs{gpu}"


def parse_cpuinfo(text: str, cores: int, gpu: str = "") -> Machine:
    """/proc/cpuinfo's text -> Machine (first processor's model name and flags)."""
    model, flags = "", set[str]()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key == "model name" and not model:
            model = value.strip()
        elif key == "flags" and not flags:
            flags = set(value.split())
    return Machine(
        cpu_model=model or platform.processor() or platform.machine() or "unknown",
        cpu_flags=tuple(f for f in RELEVANT_FLAGS if f in flags),
        cores=cores,
        gpu=gpu,
    )


@cache
def _cpuinfo() -> str:
    try:
        return Path("/proc/cpuinfo").read_text()
    except OSError:
        return ""


def cuda_name() -> str:
    """CUDA device 0's name, "" when torch sees no CUDA (imports torch)."""
    try:
        import torch

        return str(torch.cuda.get_device_name(0)) if torch.cuda.is_available() else ""
    except Exception:  # no torch, a broken driver: no GPU to speak of
        return ""


def machine(device: str = "cpu") -> Machine:
    """This machine; `device` "cuda" (or "cuda:N") adds the GPU's name."""
    gpu = cuda_name() if device.startswith("cuda") else ""
    return parse_cpuinfo(_cpuinfo(), os.cpu_count() or 1, gpu)


def load_average() -> tuple[float, float, float]:
    """1, 5 and 15 minute load averages (what a measurement's reader needs beside the machine)."""
    try:
        return os.getloadavg()
    except OSError:
        return (0.0, 0.0, 0.0)
