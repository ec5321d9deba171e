"""The tuner's event wire form: every event survives a JSON line, anything else is a ValueError."""

from __future__ import annotations

import json

import pytest

from effllm.tuner import events
from effllm.tuner.events import (
    CancelledEvent,
    DoneEvent,
    ErrorEvent,
    PhaseEvent,
    ProgressEvent,
    StagingEvent,
)

ALL = [
    PhaseEvent("loading"),
    PhaseEvent("training", total_steps=12),
    ProgressEvent(3, 12, 0.5, 1e-4, 900.0, 8.0, 1.5, 4.5),
    StagingEvent("/tmp/.staging-x"),
    DoneEvent("/out", {"method": "lora", "params": {"trainable": 10}}, "demo@2", "/root", "slot"),
    CancelledEvent(),
    ErrorEvent("ValueError: nope"),
]


@pytest.mark.parametrize("event", ALL, ids=lambda e: type(e).__name__)
def test_round_trip(event: events.Event) -> None:
    line = events.to_json(event)
    assert "\n" not in line and json.loads(line)["type"] == event.TYPE
    assert events.from_json(line) == event
    assert events.from_json(line.encode()) == event  # the manager reads bytes from the pipe


@pytest.mark.parametrize(
    "line",
    [
        "not json",
        '"a string"',
        "[1, 2]",
        "{}",
        '{"type": "nope"}',
        '{"type": "progress", "step": 1}',  # fields missing
        '{"type": "phase", "phase": "x", "extra": 1}',  # unknown field
        '{"type": ["list"]}',
    ],
)
def test_anything_else_is_a_value_error(line: str) -> None:
    with pytest.raises(ValueError):
        events.from_json(line)


def test_only_done_cancelled_error_are_terminal() -> None:
    terminal = [e for e in ALL if isinstance(e, events.TERMINAL_EVENTS)]
    assert [type(e) for e in terminal] == [DoneEvent, CancelledEvent, ErrorEvent]


def test_the_service_streams_each_record_as_its_job_event() -> None:
    from effllm.api.v1 import tuning_pb2 as pb
    from effllm.tuner.events import Record
    from effllm.tuner.service import job_event

    def msg(event: events.Event, state: str = "running") -> pb.JobEvent:
        return job_event("j1", Record(event, state, 123.5))

    progress = msg(ALL[2])
    assert progress.job_id == "j1" and progress.time_unix == 123.5 and progress.state == pb.JOB_STATE_RUNNING
    assert (progress.progress.step, progress.progress.total_steps, progress.progress.eta_s) == (3, 12, 4.5)
    assert msg(PhaseEvent("training", 12)).phase == "training"
    assert msg(StagingEvent("/x")).phase == "saving"
    assert msg(CancelledEvent(), "cancelled").phase == "cancelled"
    assert msg(ErrorEvent("boom"), "failed").error == "boom"
    done = json.loads(msg(ALL[4], "succeeded").metrics_json)
    assert done["output_dir"] == "/out" and done["metrics"]["method"] == "lora"
    assert done["published"] == "demo@2"
    assert (done["type"], done["state"], done["time"]) == ("done", "succeeded", 123.5)
