"""What a tuning run tells the world: one frozen dataclass per event, and their one wire form (a JSON line).

The training loop (train.py) and the job (worker.py) build these; the worker prints them, one JSON object a
line, on the stdout of its process; the JobManager (jobs.py) reads them back with `from_json` and keeps them
as `Record`s (the event, the job's state after it, a timestamp); the TuningService (service.py) streams the
records as JobEvents. Nothing else knows the `"type"` strings: they are written and read only here.
Invariant: `from_json(to_json(e)) == e` for every event, and `from_json` raises ValueError for any line that
is not one (a stray print from a library, a truncated line), never KeyError or TypeError.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any, ClassVar


class Cancelled(Exception):
    """Raised by a run (data generation, encoding, training, evaluation) once its `should_stop()` is true;
    the worker reports it as a CancelledEvent."""


# A run's phases in order (publishing only when asked to publish); "started" is the JobManager's own.
PHASES = ("started", "loading", "eval_before", "training", "eval_after", "saving", "publishing")


@dataclass(frozen=True)
class PhaseEvent:
    """The run entered `phase`; `total_steps` is known from "training" on (0 before)."""

    TYPE: ClassVar[str] = "phase"
    phase: str
    total_steps: int = 0


@dataclass(frozen=True)
class ProgressEvent:
    """One optimizer step done."""

    TYPE: ClassVar[str] = "progress"
    step: int
    total_steps: int
    loss: float
    lr: float
    tokens_per_s: float
    samples_per_s: float
    elapsed_s: float
    eta_s: float
    # Where this step's time went (tuner/speed.py PHASES), and the share of its token slots that were padding.
    collate_s: float = 0.0
    forward_s: float = 0.0
    backward_s: float = 0.0
    optimizer_s: float = 0.0
    padding_waste: float = 0.0


@dataclass(frozen=True)
class StagingEvent:
    """The run is writing its output under `path` (hidden); whoever kills the run must remove it."""

    TYPE: ClassVar[str] = "staging"
    path: str


@dataclass(frozen=True)
class DoneEvent:
    """The run succeeded: where it saved, a brief of its metrics, and where it published (when it did)."""

    TYPE: ClassVar[str] = "done"
    output_dir: str
    metrics: dict[str, Any] = field(default_factory=dict)
    published: str = ""  # NAME@VERSION
    adapter_root: str = ""
    residency: str = ""  # where the server holds the published adapter after LoadAdapter


@dataclass(frozen=True)
class CancelledEvent:
    TYPE: ClassVar[str] = "cancelled"


@dataclass(frozen=True)
class ErrorEvent:
    TYPE: ClassVar[str] = "error"
    error: str


Event = PhaseEvent | ProgressEvent | StagingEvent | DoneEvent | CancelledEvent | ErrorEvent
TERMINAL_EVENTS = (DoneEvent, CancelledEvent, ErrorEvent)
_BY_TYPE: dict[str, type[Any]] = {
    cls.TYPE: cls for cls in (PhaseEvent, ProgressEvent, StagingEvent, DoneEvent, CancelledEvent, ErrorEvent)
}


def to_dict(event: Event) -> dict[str, Any]:
    return {"type": event.TYPE, **dataclasses.asdict(event)}


def to_json(event: Event) -> str:
    return json.dumps(to_dict(event))


def from_dict(raw: object) -> Event:
    if not isinstance(raw, dict):
        raise ValueError(f"not an event: {raw!r:.80}")
    kind = raw.get("type")
    cls = _BY_TYPE.get(kind) if isinstance(kind, str) else None
    if cls is None:
        raise ValueError(f"unknown event type {raw.get('type')!r:.40}")
    try:
        return cls(**{k: v for k, v in raw.items() if k != "type"})  # type: ignore[no-any-return]
    except TypeError as exc:  # missing or unknown fields
        raise ValueError(f"bad {cls.TYPE} event: {exc}") from exc


def from_json(line: str | bytes) -> Event:
    return from_dict(json.loads(line))  # json.JSONDecodeError is a ValueError


@dataclass(frozen=True)
class Record:
    """An event as a job keeps it: the job's state once the event happened, and when (Unix seconds)."""

    event: Event
    state: str
    time: float
