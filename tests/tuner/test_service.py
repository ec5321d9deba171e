"""TuningService in its own `effllm tuner serve` process: validation statuses, a streamed job to the end,
and a cancel that really stops training and leaves no output."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from effllm.api.v1 import tuning_pb2 as pb
from effllm.client.tuning import TuningClient

from ..serverproc import free_port

SMALL = dict(data="task:json_extract", n_train=32, batch_size=4, max_length=64, eval_before=False)


@pytest.fixture(scope="module")
def tuner(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[TuningClient, Path]]:
    work = tmp_path_factory.mktemp("tuner")
    port = free_port()
    log = (work / "tuner.log").open("wb")
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "effllm.cli.main",
            "tuner",
            "serve",
            "--port",
            str(port),
            "--log-dir",
            str(work / "jobs"),
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        env={**os.environ},
    )
    client = TuningClient(f"127.0.0.1:{port}", timeout=120)
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                client.list()
                break
            except grpc.RpcError:
                assert proc.poll() is None and time.monotonic() < deadline, (work / "tuner.log").read_text()
                time.sleep(0.3)
        yield client, work
    finally:
        client.close()
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


def test_bad_submissions_get_clear_statuses(tuner: tuple[TuningClient, Path], tmp_path: Path) -> None:
    client, _ = tuner
    with pytest.raises(grpc.RpcError) as err:
        client.submit(method="qlora", data="task:json_extract")
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and err.value.details().startswith("method:")
    with pytest.raises(grpc.RpcError) as err:
        client.submit(method="lora", data="task:json_extract", rank=0)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and err.value.details().startswith("rank:")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"prompt": "no response"}\n')
    with pytest.raises(grpc.RpcError) as err:
        client.submit(method="lora", data=str(bad))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "bad.jsonl:2:" in err.value.details()
    with pytest.raises(grpc.RpcError) as err:
        client.submit(
            method="full",
            data="task:json_extract",
            publish=pb.PublishSpec(server="127.0.0.1:1", name="x", adapter_root=str(tmp_path)),
        )
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "publish:" in err.value.details()
    with pytest.raises(grpc.RpcError) as err:
        client.submit(method="lora", data="task:json_extract", output_dir=str(tmp_path))
    assert err.value.code() == grpc.StatusCode.ALREADY_EXISTS
    for call in (client.cancel, lambda j: list(client.watch(j))):
        with pytest.raises(grpc.RpcError) as err:
            call("nope")
        assert err.value.code() == grpc.StatusCode.NOT_FOUND


def test_cancel_stops_training_and_leaves_no_output(tuner: tuple[TuningClient, Path], tmp_path: Path) -> None:
    client, _ = tuner
    out = tmp_path / "never"
    job = client.submit(method="lora", max_steps=1000, n_eval=0, output_dir=str(out), **SMALL)
    assert job.state == pb.JOB_STATE_QUEUED and job.job_id
    steps = []
    for event in client.watch(job.job_id, timeout=900):  # model load + 2 steps; minutes on a busy host
        if event.HasField("progress"):
            steps.append(event.progress.step)
            assert event.progress.total_steps == 1000 and event.progress.tokens_per_s > 0
            assert event.progress.eta_s > 0
            if len(steps) == 2:
                break
    assert steps == [1, 2]
    t0 = time.monotonic()
    info = client.cancel(job.job_id)
    assert info.state == pb.JOB_STATE_CANCELLED and info.step < 1000
    assert time.monotonic() - t0 < 60  # stopped at the next micro-batch, not after 1000 steps
    events = list(client.watch(job.job_id, timeout=30))  # replay ends with the terminal event
    assert events[-1].state == pb.JOB_STATE_CANCELLED and events[-1].phase == "cancelled"
    assert not out.exists() and not list(tmp_path.iterdir())
    with pytest.raises(grpc.RpcError) as err:
        client.cancel(job.job_id)
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION


def test_job_streams_progress_to_final_metrics(tuner: tuple[TuningClient, Path]) -> None:
    client, work = tuner
    job = client.submit(method="dora", max_steps=3, n_eval=4, eval_max_new_tokens=8, **SMALL)
    events = list(client.watch(job.job_id, timeout=900))
    phases = [e.phase for e in events if e.phase]
    assert phases[:2] == ["started", "loading"] and "training" in phases and "saving" in phases
    assert [e.progress.step for e in events if e.HasField("progress")] == [1, 2, 3]
    last = events[-1]
    assert last.state == pb.JOB_STATE_SUCCEEDED, [e.error for e in events]
    done = json.loads(last.metrics_json)
    assert done["metrics"]["method"] == "dora" and done["metrics"]["eval_after"]["n"] == 4
    out = Path(done["output_dir"])
    assert out.parent == work / "jobs" / job.job_id and (out / "adapter_model.safetensors").is_file()
    assert json.loads((out / "adapter_config.json").read_text())["use_dora"] is True
    listed = {j.job_id: j for j in client.list()}
    assert listed[job.job_id].state == pb.JOB_STATE_SUCCEEDED and listed[job.job_id].step == 3
    assert listed[job.job_id].output_dir == str(out)
