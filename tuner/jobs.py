"""Tuning jobs in child processes: a queue, per-job event logs that any number of watchers replay, cancel.

Each job runs `python -m effllm.tuner.worker SPEC` (see worker.py), in a process group of its own, so
training never blocks the gRPC loop and a cancel really stops it: SIGTERM makes the worker stop where it next
polls (data generation, encoding, each micro-batch) and clean up; if it has not exited after
`TunerLimits.cancel_grace_s` (3 s), SIGKILL to its group, and the manager removes the staging dir the worker
announced. The manager holds at most `max_jobs` unfinished jobs and forgets finished ones past
`max_finished_jobs` or `finished_job_ttl_s`, oldest first (their folders stay on disk).
Invariant: a job's events only grow; its state is terminal (succeeded/failed/cancelled) exactly when the last
event says so, and then watchers' streams end. Only a finished job is forgotten.
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
from collections.abc import AsyncIterator, Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from effllm.api.errors import EffllmError

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
from .limits import TunerLimits

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
    task: asyncio.Task[None] | None = None  # its _run, waiting for a slot while queued
    changed: asyncio.Condition = field(default_factory=asyncio.Condition)


class JobManager:
    def __init__(
        self,
        work_root: Path,
        limits: TunerLimits | None = None,
        worker_env: dict[str, str] | None = None,
    ) -> None:
        self.work_root = work_root
        self.limits = limits or TunerLimits()
        self.worker_env = worker_env or {}  # e.g. the publish token: env, not argv (which `ps` shows)
        self.jobs: dict[str, Job] = {}
        self._slots = asyncio.Semaphore(self.limits.max_running)
        self._tasks: set[asyncio.Task[None]] = set()

    def check_capacity(self) -> None:
        """EffllmError resource_exhausted when `max_jobs` jobs are queued or running."""
        unfinished = sum(j.state not in TERMINAL for j in self.jobs.values())
        if unfinished >= self.limits.max_jobs:
            raise EffllmError(
                "resource_exhausted",
                f"SubmitJob: {unfinished} jobs are queued or running, this tuner's limit (--max-jobs "
                f"{self.limits.max_jobs}); retry when one has finished, or cancel one",
            )

    def prune(self, now: float | None = None) -> None:
        """Forget finished jobs past `max_finished_jobs` (the oldest first) or older than the TTL."""
        now = time.time() if now is None else now
        finished = sorted((j for j in self.jobs.values() if j.state in TERMINAL), key=lambda j: j.finished)
        excess = len(finished) - self.limits.max_finished_jobs
        for i, job in enumerate(finished):
            if i < excess or now - job.finished > self.limits.finished_job_ttl_s:
                del self.jobs[job.id]

    def submit(self, config: TuneConfig, publish: dict[str, str] | None = None) -> Job:
        """A queued job, or EffllmError resource_exhausted (see check_capacity)."""
        self.prune()
        self.check_capacity()
        job_id = uuid.uuid4().hex[:12]
        workdir = self.work_root / job_id
        if not config.output_dir:
            config = config.replace(output_dir=str((workdir / "output").resolve()))
        job = Job(job_id, config, publish, workdir)
        self.jobs[job_id] = job
        job.task = self._spawn(self._run(job))
        return job

    async def _record(self, job: Job, event: Event, state: str | None = None) -> None:
        async with job.changed:
            if state is not None:
                job.state = state
                if state in TERMINAL:
                    job.finished = time.time()
            job.events.append(Record(event, job.state, time.time()))
            job.changed.notify_all()
        if state in TERMINAL:
            self.prune()

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
                    start_new_session=True,  # its own process group: SIGKILL reaches its children too
                )
            await self._record(job, PhaseEvent("started"), RUNNING)
            if job.cancel_requested:  # cancel arrived while the process was starting
                self._spawn(self._stop(job))
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
            if job.task is not None:
                job.task.cancel()  # it waits for a slot: no need to take one
            return
        if job.proc is None:
            return  # starting: _run stops it once the process exists
        await self._stop(job)

    async def _stop(self, job: Job) -> None:
        """SIGTERM, then SIGKILL to the worker's process group after the grace (a phase that does not poll:
        a model load, a save, a compile); _run then removes the staging dirs and records CANCELLED."""
        proc = job.proc
        assert proc is not None
        if proc.returncode is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(proc.wait(), self.limits.cancel_grace_s)
        except asyncio.TimeoutError:
            log.warning(
                "job %s still running %.1fs after SIGTERM; killing it", job.id, self.limits.cancel_grace_s
            )
            if proc.returncode is None:  # not reaped yet, so its pid (= its group's id) is still its own
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(proc.pid, signal.SIGKILL)

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

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
