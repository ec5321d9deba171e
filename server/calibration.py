"""What `--precision auto` / `--engine auto` / compiled decode become: from the machine, or from a stored
calibration (`effllm calibrate`) taken on this very machine, model and library versions.

The rule (docs/performance.md "auto"):
- With a calibration whose key matches exactly: among the measured configurations that the fixed flags
  allow (int4 never: it costs quality), keep those whose tok/s at c=max is at least `CMAX_SHARE` (0.9) of
  the best at c=max, and of those take the best at c=1. Throughput under load is guarded, latency of a
  lone request decides.
- Without one: precision from the hardware (CUDA, or a CPU with native bf16 `amx_bf16` / `avx512_bf16`
  -> bf16, else fp32); the engine: hf for bf16 on CPU (it beat vLLM's CPU bf16 at every concurrency on
  both CPUs measured, docs/performance.md and issue 23), else vllm; compiled decode off (its first start
  pays minutes of Inductor compile that only a measurement can say is worth it).
Invariant: `choose_auto` is pure (no I/O, no torch); a calibration is used only when its key (machine,
model fingerprint, torch/transformers/vllm versions) equals this start's key, field for field.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import statistics
import tempfile
from dataclasses import asdict, dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

from ..common.model import cache_dir
from ..telemetry.machine import Machine

log = logging.getLogger("effllm.server")

CMAX_SHARE = 0.9  # a config is eligible when its c=max tok/s is at least this share of the best c=max
ENGINES = ("vllm", "hf")
CAL_PRECISIONS = ("fp32", "bf16", "int4")  # what `effllm calibrate` measures (fp16: no native CPU path)
LIBRARIES = ("torch", "transformers", "vllm")
_FORMAT = 1


@dataclass(frozen=True)
class Config:
    """One servable configuration: precision x engine x compiled decode (hf only)."""

    precision: str
    engine: str
    compiled: bool = False

    def __post_init__(self) -> None:
        if self.precision not in CAL_PRECISIONS or self.engine not in ENGINES:
            raise ValueError(
                f"config {self.name!r}: precision one of {CAL_PRECISIONS}, engine one of {ENGINES}"
            )
        if self.compiled and self.engine != "hf":
            raise ValueError(f"config {self.name!r}: compiled decode is the hf engine's")

    @property
    def name(self) -> str:
        return f"{self.precision}:{self.engine}" + (":compiled" if self.compiled else "")

    def describe(self) -> str:
        return f"{self.precision} {self.engine}" + (" compiled" if self.compiled else "")

    @classmethod
    def parse(cls, spec: str) -> Config:
        """ "bf16:hf:compiled" / "fp32:vllm" -> Config; ValueError names the spec."""
        parts = spec.strip().split(":")
        if len(parts) not in (2, 3) or (len(parts) == 3 and parts[2] != "compiled"):
            raise ValueError(f"--configs {spec!r}: PRECISION:ENGINE[:compiled]")
        return cls(parts[0], parts[1], len(parts) == 3)


def all_configs() -> tuple[Config, ...]:
    return tuple(
        Config(p, e, c) for p in CAL_PRECISIONS for e in ENGINES for c in (False, True) if e == "hf" or not c
    )


@dataclass(frozen=True)
class Figure:
    """tok/s over `samples` repeats: the median, and the lowest and highest seen."""

    median: float
    low: float
    high: float
    samples: int

    @classmethod
    def of(cls, values: list[float]) -> Figure:
        return cls(statistics.median(values), min(values), max(values), len(values))

    def __str__(self) -> str:
        return f"{self.median:.1f} ({self.low:.1f}-{self.high:.1f}, n={self.samples})"


@dataclass(frozen=True)
class Measured:
    """One configuration's figures at c=1 and c=max, or why it was not measured."""

    config: Config
    c1: Figure | None = None
    cmax: Figure | None = None
    skipped: str = ""  # why not measured (the engine cannot run it here, or it failed)


@dataclass(frozen=True)
class Key:
    """What a calibration holds for: the hardware, the model's weights, the libraries running it."""

    machine: Machine
    model: str  # common/model.py fingerprint
    versions: tuple[tuple[str, str], ...]

    def digest(self) -> str:
        return hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True).encode()).hexdigest()

    def to_dict(self) -> dict[str, Any]:
        return {"machine": self.machine.to_dict(), "model": self.model, "versions": dict(self.versions)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Key:
        m = d["machine"]
        machine = Machine(str(m["cpu_model"]), tuple(m["cpu_flags"]), int(m["cores"]), str(m.get("gpu", "")))
        return cls(
            machine, str(d["model"]), tuple(sorted((str(k), str(v)) for k, v in d["versions"].items()))
        )


def library_versions() -> tuple[tuple[str, str], ...]:
    out = []
    for name in LIBRARIES:
        try:
            out.append((name, metadata.version(name)))
        except metadata.PackageNotFoundError:
            out.append((name, "absent"))
    return tuple(sorted(out))


@dataclass(frozen=True)
class Calibration:
    key: Key
    taken: str  # UTC date-time, ISO 8601
    max_concurrency: int
    new_tokens: int  # every request decoded exactly this many
    requests: int  # requests per repeat at each concurrency
    rows: tuple[Measured, ...]
    context: dict[str, Any] = field(default_factory=dict)  # lscpu model, load average: for the reader

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["key"] = self.key.to_dict()
        d["format"] = _FORMAT
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Calibration:
        if d.get("format") != _FORMAT:
            raise ValueError(f"calibration format {d.get('format')!r}, expected {_FORMAT}")

        def fig(x: dict[str, Any] | None) -> Figure | None:
            return (
                None
                if x is None
                else Figure(float(x["median"]), float(x["low"]), float(x["high"]), int(x["samples"]))
            )

        rows = tuple(
            Measured(Config(**r["config"]), fig(r["c1"]), fig(r["cmax"]), str(r.get("skipped", "")))
            for r in d["rows"]
        )
        return cls(
            Key.from_dict(d["key"]),
            str(d["taken"]),
            int(d["max_concurrency"]),
            int(d["new_tokens"]),
            int(d["requests"]),
            rows,
            dict(d.get("context", {})),
        )


# --- storage --------------------------------------------------------------------------------------------
def store_dir() -> Path:
    return cache_dir() / "calibration"


def path_for(key: Key) -> Path:
    return store_dir() / f"{key.digest()[:24]}.json"


def save(cal: Calibration) -> Path:
    """Write atomically (temp file + rename): a reader sees the old calibration or the new one, whole."""
    path = path_for(cal.key)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".cal-", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as fh:
            json.dump(cal.to_dict(), fh, indent=2)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def load(key: Key) -> Calibration | None:
    """The stored calibration for exactly `key`, else None (none, unreadable, or taken under another key)."""
    path = path_for(key)
    if not path.is_file():
        return None
    try:
        cal = Calibration.from_dict(json.loads(path.read_text()))
    except (OSError, ValueError, KeyError, TypeError) as exc:
        log.warning("calibration %s unreadable (%s): ignored", path, exc)
        return None
    return cal if cal.key == key else None


# --- the auto rule ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Choice:
    precision: str
    engine: str
    compile_decode: bool
    reason: str


def hardware_precision(machine: Machine) -> tuple[str, str]:
    """(precision, why) from the hardware alone."""
    if machine.gpu:
        return "bf16", f"cuda ({machine.gpu})"
    if machine.cpu_bf16:
        return "bf16", f"cpu has {machine.cpu_bf16}"
    return "fp32", "cpu has no native bf16 (neither amx_bf16 nor avx512_bf16)"


def choose_auto(
    machine: Machine,
    calibration: Calibration | None = None,
    *,
    precision: str | None = None,
    engine: str | None = None,
    compiled: bool | None = None,
) -> Choice:
    """The configuration `auto` resolves to. precision / engine / compiled: what the flags fix (None: free).
    The calibration is used as given: the caller passes only one whose key matched (see `load`)."""
    hardware = _from_hardware(machine, precision, engine, compiled, calibration)
    if calibration is not None:
        picked = _calibrated(calibration, precision, engine, compiled, hardware)
        if picked is not None:
            return picked
    return hardware


def _from_hardware(
    machine: Machine,
    precision: str | None,
    engine: str | None,
    compiled: bool | None,
    calibration: Calibration | None,
) -> Choice:
    hw, why = hardware_precision(machine)
    p = precision or hw
    e = engine or ("hf" if p == "bf16" and not machine.gpu else "vllm")
    if p == "int4" and not machine.gpu:
        e = engine or "hf"  # vLLM's CPU backend has no int4
    c = bool(compiled) and e == "hf"
    if precision is not None:
        why = f"--precision {precision}"
    reason = f"{p} {e}{' compiled' if c else ''}: {why}"
    if calibration is None:
        reason += "; no calibration for this machine, model and versions (effllm calibrate)"
    else:
        reason += "; the calibration has no figures for the configurations the flags allow"
    return Choice(p, e, c, reason)


def _calibrated(
    cal: Calibration, precision: str | None, engine: str | None, compiled: bool | None, hardware: Choice
) -> Choice | None:
    def allowed(m: Measured) -> bool:
        c = m.config
        return (
            m.c1 is not None
            and m.cmax is not None
            and (c.precision != "int4" or precision == "int4")  # int4 only when asked for: it costs quality
            and (precision is None or c.precision == precision)
            and (engine is None or c.engine == engine)
            and (compiled is None or c.compiled == compiled)
        )

    rows = [m for m in cal.rows if allowed(m)]
    if not rows:
        return None
    best_cmax = max(m.cmax.median for m in rows if m.cmax is not None)
    eligible = [m for m in rows if m.cmax is not None and m.cmax.median >= CMAX_SHARE * best_cmax]
    pick = max(eligible, key=lambda m: m.c1.median if m.c1 else 0.0)
    assert pick.c1 is not None and pick.cmax is not None
    # said against what the machine alone would have chosen, else against the next best (int4 aside)
    plain = Config(hardware.precision, hardware.engine, hardware.compile_decode)
    others = [m for m in cal.rows if m.c1 is not None and m is not pick and m.config.precision != "int4"]
    runner = next((m for m in others if m.config == plain), None) or max(
        others, key=lambda m: m.c1.median if m.c1 else 0.0, default=None
    )
    against = f" against {runner.config.describe()} {_rate(runner.c1.median)}" if runner and runner.c1 else ""
    reason = (
        f"{pick.config.describe()}: calibrated {_rate(pick.c1.median)} tok/s at c=1 and "
        f"{_rate(pick.cmax.median)} at c={cal.max_concurrency}{against}, {cal.taken[:10]}"
    )
    c = pick.config
    return Choice(c.precision, c.engine, c.compiled, reason)


def _rate(tok_s: float) -> str:
    return f"{tok_s:.0f}" if tok_s >= 10 else f"{tok_s:.1f}"
