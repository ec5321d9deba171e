"""Tuning jobs in child processes: a queue, per-job event logs that any number of watchers replay, cancel.

Each job runs `python -m effllm.tuner.worker SPEC` (see worker.py) so training never blocks the gRPC loop and
a cancel really stops it: SIGTERM makes the worker stop at its next micro-batch and clean up; if it has not
exited after `kill_after_s`, SIGKILL, and the manager removes the staging dir the worker announced.
Invariant: a job's events only grow; its state is terminal (succeeded/failed/cancelled) exactly when the last
event says so, and then watchers' streams end.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import shutil
import signal
import sys
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

from . import events
from .config import TuneConfig
from .events import (
    CancelledEvent,
    DoneEvent,
    ErrorEvent,
    Event,
    PhaseEvent,
    ProgressEvent,
    Record,
    StagingEvent,
)

log = logging.getLogger("effllm.tuner.jobs")

QUEUED, RUNNING, SUCCEEDED, FAILED, CANCELLED = "queued", "running", "succeeded", "failed", "cancelled"
TERMINAL = (SUCCEEDED, FAILED, CANCELLED)


@dataclass
class Job:
    id: str
    config: TuneConfig
    publish: dict[str, str] | None
    workdir: Path
    state: str = QUEUED
    events: list[Record] = field(default_factory=list)
    created: float = field(default_factory=time.time)
    finished: float = 0.0
    step: int = 0
    total_steps: int = 0
    loss: float = 0.0
    output_dir: str = ""
    published: str = ""
    error: str = ""
    cancel_requested: bool = False
    started: bool = False  # holds a running slot (its worker is starting or running)
    staging: list[str] = field(default_factory=list)
    proc: asyncio.subprocess.Process | None = None
    changed: asyncio.Condition = field(default_factory=asyncio.Condition)


class JobManager:
    def __init__(
        self,
        work_root: Path,
        max_running: int = 1,
        kill_after_s: float = 30.0,
        worker_env: dict[str, str] | None = None,
    ) -> None:
        self.work_root = work_root
        self.worker_env = worker_env or {}  # e.g. the publish token: env, not argv (which `ps` shows)
        self.kill_after_s = kill_after_s
        self.jobs: dict[str, Job] = {}
        self._slots = asyncio.Semaphore(max_running)
        self._tasks: set[asyncio.Task[None]] = set()

    def submit(self, config: TuneConfig, publish: dict[str, str] | None = None) -> Job:
        job_id = uuid.uuid4().hex[:12]
        workdir = self.work_root / job_id
        if not config.output_dir:
            config = config.replace(output_dir=str((workdir / "output").resolve()))
        job = Job(job_id, config, publish, workdir)
        self.jobs[job_id] = job
        task = asyncio.create_task(self._run(job))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return job

    async def _record(self, job: Job, event: Event, state: str | None = None) -> None:
        async with job.changed:
            if state is not None:
                job.state = state
                if state in TERMINAL:
                    job.finished = time.time()
            job.events.append(Record(event, job.state, time.time()))
            job.changed.notify_all()

    async def _run(self, job: Job) -> None:
        async with self._slots:
            job.started = True  # no await since the slot was taken: cancel() sees this or a queued job
            if job.cancel_requested:  # cancelled while queued: already recorded by cancel()
                return
            job.workdir.mkdir(parents=True, exist_ok=True)
            spec = json.dumps({"config": job.config.to_dict(), "publish": job.publish})
            with (job.workdir / "worker.log").open("wb") as errlog:
                job.proc = await asyncio.create_subprocess_exec(
                    sys.executable,
                    "-m",
                    "effllm.tuner.worker",
                    spec,
                    stdout=asyncio.subprocess.PIPE,
                    stderr=errlog,
                    env={**os.environ, **self.worker_env, "TQDM_DISABLE": "1"},
                )
            await self._record(job, PhaseEvent("started"), RUNNING)
            if job.cancel_requested:  # cancel arrived while the process was starting
                job.proc.send_signal(signal.SIGTERM)
            last: Event | None = None
            assert job.proc.stdout is not None
            async for raw in job.proc.stdout:
                try:
                    event = events.from_json(raw)
                except ValueError:
                    continue  # a stray print from a library; events are JSON lines
                last = event
                self._apply(job, event)
                if not isinstance(event, events.TERMINAL_EVENTS):
                    await self._record(job, event)
            rc = await job.proc.wait()
            if isinstance(last, DoneEvent) and rc == 0:
                await self._record(job, last, SUCCEEDED)
                return
            self._remove_partial(job)
            if job.cancel_requested or isinstance(last, CancelledEvent):
                await self._record(job, CancelledEvent(), CANCELLED)
            else:
                reported = last.error if isinstance(last, ErrorEvent) else ""
                job.error = reported or f"worker exited with {rc}; see {job.workdir / 'worker.log'}"
                await self._record(job, ErrorEvent(job.error), FAILED)

    @staticmethod
    def _apply(job: Job, event: Event) -> None:
        if isinstance(event, ProgressEvent):
            job.step, job.total_steps, job.loss = event.step, event.total_steps, event.loss
        elif isinstance(event, PhaseEvent) and event.total_steps:
            job.total_steps = event.total_steps
        elif isinstance(event, StagingEvent):
            job.staging.append(event.path)
        elif isinstance(event, DoneEvent):
            job.output_dir = event.output_dir
            job.published = event.published

    def _remove_partial(self, job: Job) -> None:
        """A worker killed while saving leaves its hidden staging dir: remove it."""
        for path in job.staging:
            shutil.rmtree(path, ignore_errors=True)

    async def cancel(self, job: Job) -> None:
        if job.state in TERMINAL:
            return
        job.cancel_requested = True
        if not job.started:  # queued: it ends now, not when a running job frees a slot
            await self._record(job, CancelledEvent(), CANCELLED)
            return
        proc = job.proc
        if proc is None or proc.returncode is not None:
            return  # starting: _run sends SIGTERM once the process exists
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(proc.wait(), self.kill_after_s)
        except asyncio.TimeoutError:
            log.warning("job %s ignored SIGTERM for %.0fs; killing it", job.id, self.kill_after_s)
            with contextlib.suppress(ProcessLookupError):
                proc.kill()

    async def watch(self, job: Job) -> AsyncIterator[Record]:
        """Every event of the job from the first, then live ones, until the terminal one."""
        index = 0
        while True:
            async with job.changed:
                await job.changed.wait_for(lambda n=index: len(job.events) > n)  # type: ignore[misc]
                batch = job.events[index:]
            for record in batch:
                index += 1
                yield record
                if record.state in TERMINAL:
                    return

    async def wait_terminal(self, job: Job) -> None:
        async with job.changed:
            await job.changed.wait_for(lambda: job.state in TERMINAL)

    async def shutdown(self) -> None:
        for job in list(self.jobs.values()):
            await self.cancel(job)
        for task in list(self._tasks):
            with contextlib.suppress(asyncio.CancelledError):
                await task
