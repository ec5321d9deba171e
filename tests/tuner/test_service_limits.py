"""The TuningService's bounds, against a real in-process grpc.aio server (tests/tuner/inprocess.py):
`hf:` data only as a hub id (the same refusal for existing and missing paths), a cap on queued + running
jobs (RESOURCE_EXHAUSTED), finished jobs forgotten by count and age (then NOT_FOUND), job sizes bounded
(INVALID_ARGUMENT naming the field), and CancelJob stopping a real worker within 5 s while it generates
data for a huge n_train."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from effllm.api.v1 import tuning_pb2 as pb
from effllm.client.tuning import TuningClient
from effllm.tuner.limits import TunerLimits

from .inprocess import InProcessTuner


@pytest.fixture()
def queued_only(tmp_path: Path) -> Iterator[tuple[InProcessTuner, TuningClient]]:
    """No running slot: accepted jobs stay queued (nothing trains); 2 unfinished, 2 finished jobs kept."""
    limits = TunerLimits(max_running=0, max_jobs=2, max_finished_jobs=2, memory_budget_mb=256)
    tuner = InProcessTuner(tmp_path, limits, hub_data=True)
    client = TuningClient(tuner.target, timeout=30)
    try:
        yield tuner, client
    finally:
        client.close()
        tuner.close()


def _refusal(client: TuningClient, **fields: object) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as err:
        client.submit(**fields)
    return err.value


def test_hf_paths_are_refused_alike_and_hub_ids_accepted(
    queued_only: tuple[InProcessTuner, TuningClient],
) -> None:
    tuner, client = queued_only
    (tuner.root / "outside").mkdir()
    (tuner.root / "outside" / "train.jsonl").write_text('{"text": "secret"}\n')
    for field in ("data", "eval_data"):
        answers = set()
        for value in (
            f"hf:{tuner.root / 'outside'}",  # exists
            f"hf:{tuner.root / 'missing'}",
            "hf:/etc",
            "hf:../../..",
            "hf:../outside",
            "hf:../nonexistent",
        ):
            err = _refusal(client, **{"data": "task:json_extract", field: value})
            assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, (field, value)
            assert err.details().startswith(f"{field}: hf: takes a hub dataset id"), err.details()
            answers.add(err.details())
        assert len(answers) == 1, answers
    job = client.submit(data="hf:rajpurkar/squad", eval_data="hf:owner/held-out:test")
    assert job.state == pb.JOB_STATE_QUEUED and job.data == "hf:rajpurkar/squad"
    assert client.cancel(job.job_id).state == pb.JOB_STATE_CANCELLED


def test_job_cap_answers_resource_exhausted_and_frees_on_cancel(
    queued_only: tuple[InProcessTuner, TuningClient],
) -> None:
    _, client = queued_only
    first, _ = client.submit(data="task:json_extract"), client.submit(data="task:json_extract")
    err = _refusal(client, data="task:json_extract")
    assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "2 jobs are queued or running, this tuner's limit (--max-jobs 2)" in err.details()
    assert len(client.list()) == 2
    client.cancel(first.job_id)
    assert client.submit(data="task:json_extract").state == pb.JOB_STATE_QUEUED


def test_finished_jobs_are_forgotten_oldest_first_by_count_and_age(
    queued_only: tuple[InProcessTuner, TuningClient],
) -> None:
    tuner, client = queued_only
    ids = []
    for _ in range(3):
        ids.append(client.submit(data="task:json_extract").job_id)
        client.cancel(ids[-1])
    assert {j.job_id for j in client.list()} == set(ids[1:])  # max_finished_jobs 2: the oldest went
    for call in (client.cancel, lambda job_id: list(client.watch(job_id, timeout=10))):
        with pytest.raises(grpc.RpcError) as err:
            call(ids[0])
        assert err.value.code() == grpc.StatusCode.NOT_FOUND
    assert [e.state for e in client.watch(ids[2], timeout=10)][-1] == pb.JOB_STATE_CANCELLED
    running = client.submit(data="task:json_extract")
    # a day later: the finished ones are past the TTL, the unfinished one stays
    tuner.call(_prune(tuner, time.time() + tuner.manager.limits.finished_job_ttl_s + 1))
    assert [j.job_id for j in client.list()] == [running.job_id]


async def _prune(tuner: InProcessTuner, now: float) -> None:
    tuner.manager.prune(now)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("n_train", 2_147_483_647),
        ("n_eval", 100_000),
        ("max_steps", 10**9),
        ("epochs", 10**6),
        ("max_length", 32768),
        ("batch_size", 100_000),
        ("rank", 100_000),
        ("eval_max_new_tokens", 10**6),
    ],
)
def test_job_sizes_past_the_bounds_are_invalid_argument_naming_the_field(
    queued_only: tuple[InProcessTuner, TuningClient], field: str, value: int
) -> None:
    _, client = queued_only
    err = _refusal(client, **{"data": "task:json_extract", field: value})
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert err.details().startswith(f"{field}: {value} is over this tuner's limit"), err.details()
    # under the count bound but over the memory budget (256 MiB): refused with the rule
    err = _refusal(client, data="task:json_extract", n_train=900_000, max_length=128, max_steps=10)
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert err.details().startswith(
        "n_train: (n_train 900000 + n_eval 64) x (2048 B + 80 B x max_length 128)"
    )
    assert client.list() == []


def test_cancel_during_data_generation_stops_a_real_worker_within_5s(tmp_path: Path) -> None:
    limits = TunerLimits(max_running=1, memory_budget_mb=8192)
    tuner = InProcessTuner(tmp_path, limits)
    client = TuningClient(tuner.target, timeout=30)
    try:
        # ~30 s of generation on a free core, 2 GiB if it ran to the end; under the bound (3.4 GiB of 8)
        job = client.submit(
            data="task:json_extract",
            n_train=1_000_000,
            n_eval=0,
            max_length=16,
            max_steps=10,
            eval_before=False,
        )
        phases = []
        for event in client.watch(job.job_id, timeout=120):
            phases.append(event.phase)
            if event.phase == "loading":  # the worker has started generating its data
                break
        time.sleep(1.0)
        worker = tuner.manager.jobs[job.job_id].proc
        assert worker is not None and worker.returncode is None  # still generating
        t0 = time.monotonic()
        info = client.cancel(job.job_id)
        took = time.monotonic() - t0
        assert info.state == pb.JOB_STATE_CANCELLED, info
        assert took < 5.0, took
        events = list(client.watch(job.job_id, timeout=10))
        assert events[-1].phase == "cancelled" and "training" not in [e.phase for e in events]
        assert worker.returncode == 3  # the worker stopped itself (SIGTERM honoured), no SIGKILL needed
    finally:
        client.close()
        tuner.close()


def test_a_worker_that_ignores_sigterm_is_killed_after_the_grace(tmp_path: Path) -> None:
    """Phases that do not poll (a model load, a save, a compile) end by SIGKILL to the worker's group."""
    from effllm.tuner.config import TuneConfig
    from effllm.tuner.jobs import RUNNING, Job, JobManager

    async def run() -> tuple[float, int | None, int]:
        manager = JobManager(tmp_path, TunerLimits(cancel_grace_s=1.0))
        # a stand-in worker deaf to SIGTERM, with a child of its own (an Inductor compile worker, say)
        deaf = "import signal, subprocess, sys, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
        deaf += "c = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']); "
        deaf += "print(c.pid, flush=True); time.sleep(60)"
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-c", deaf, stdout=asyncio.subprocess.PIPE, start_new_session=True
        )
        assert proc.stdout is not None
        child = int(await proc.stdout.readline())
        job = Job("deaf", TuneConfig(), None, tmp_path, state=RUNNING, started=True, proc=proc)
        t0 = time.monotonic()
        await manager.cancel(job)
        took = time.monotonic() - t0
        await proc.stdout.read()  # to EOF, so the transport closes on this loop
        return took, await proc.wait(), child

    took, rc, child = asyncio.run(run())
    assert rc == -signal.SIGKILL and 1.0 <= took < 3.0, (rc, took)
    deadline = time.monotonic() + 5
    while _alive(child) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _alive(child)  # the group went with it


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as fh:  # a zombie waiting for init to reap it is dead too
        return fh.read().split(") ")[1][0] != "Z"
