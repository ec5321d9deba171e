"""TuningService in its own `effllm tuner serve` process, with a token and roots: every RPC needs the admin
role, every job path stays inside its root (same answer for /etc/shadow and /nonexistent), publishing only
to a configured server; validation statuses, a streamed job to the end, and a cancel that really stops
training and leaves no output."""

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
from effllm.api.v1 import tuning_pb2_grpc as pb_grpc
from effllm.client.channel import ClientSecurity
from effllm.client.tuning import TuningClient

from ..serverproc import free_port

SMALL = dict(data="task:json_extract", n_train=32, batch_size=4, max_length=64, eval_before=False)
ADMIN = "tuner-admin-token-0123456789"
GENERATE = "tuner-generate-token-012345"


@pytest.fixture(scope="module")
def tuner(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[TuningClient, Path]]:
    """The client (admin token) and the work dir: roots work/data, work/out, work/adapters."""
    work = tmp_path_factory.mktemp("tuner")
    for root in ("data", "out", "adapters"):
        (work / root).mkdir()
    tokens = work / "tokens"
    tokens.write_text(f"admin {ADMIN}\ngenerate {GENERATE}\n")
    tokens.chmod(0o600)
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
            "--auth-token-file",
            str(tokens),
            "--data-root",
            str(work / "data"),
            "--output-root",
            str(work / "out"),
            "--adapter-root",
            str(work / "adapters"),
            "--publish-server",
            "nowhere=127.0.0.1:1",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        env={k: v for k, v in os.environ.items() if not k.startswith("EFFLLM_") or "TOKEN" not in k},
    )
    client = TuningClient(f"127.0.0.1:{port}", timeout=120, security=ClientSecurity(token=ADMIN))
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


def _calls(stub: pb_grpc.TuningServiceStub) -> dict[str, object]:
    """Every TuningService RPC, each with a request that would pass validation if it got that far."""
    return {
        "SubmitJob": lambda md: stub.SubmitJob(
            pb.SubmitJobRequest(config=pb.TuneConfig(data="task:json_extract")), metadata=md, timeout=30
        ),
        "WatchJob": lambda md: list(stub.WatchJob(pb.WatchJobRequest(job_id="x"), metadata=md, timeout=30)),
        "CancelJob": lambda md: stub.CancelJob(pb.CancelJobRequest(job_id="x"), metadata=md, timeout=30),
        "ListJobs": lambda md: stub.ListJobs(pb.ListJobsRequest(), metadata=md, timeout=30),
    }


@pytest.mark.parametrize(
    ("metadata", "code"),
    [
        ((), grpc.StatusCode.UNAUTHENTICATED),
        ((("authorization", "Bearer wrong-token-0123456789abc"),), grpc.StatusCode.UNAUTHENTICATED),
        ((("authorization", f"Basic {ADMIN}"),), grpc.StatusCode.UNAUTHENTICATED),
        ((("authorization", f"Bearer {GENERATE}"),), grpc.StatusCode.PERMISSION_DENIED),
    ],
    ids=["no-token", "unknown-token", "wrong-scheme", "generate-role"],
)
def test_every_rpc_needs_the_admin_token(
    tuner: tuple[TuningClient, Path], metadata: tuple[tuple[str, str], ...], code: grpc.StatusCode
) -> None:
    client, _ = tuner
    before = len(client.list())
    stub = pb_grpc.TuningServiceStub(grpc.insecure_channel(client.target))
    for name, call in _calls(stub).items():
        with pytest.raises(grpc.RpcError) as err:
            call(metadata)  # type: ignore[operator]
        assert err.value.code() == code, name
    assert len(client.list()) == before  # the refused SubmitJob made no job


def test_every_path_outside_its_root_is_refused_without_an_existence_oracle(
    tuner: tuple[TuningClient, Path],
) -> None:
    client, work = tuner
    (work / "data" / "out-link.jsonl").symlink_to("/etc/passwd")
    (work / "out" / "escape").symlink_to(work)
    for field, values in {
        "data": ["/etc/shadow", "/nonexistent", "/etc/passwd", "../tokens", "out-link.jsonl"],
        "eval_data": ["/etc/shadow", "/nonexistent"],
        "model": ["/etc", "/nonexistent"],
        "output_dir": ["/etc", "/nonexistent/new", "/tmp/pwn", "escape/new"],
    }.items():
        answers = set()
        for value in values:
            with pytest.raises(grpc.RpcError) as err:
                client.submit(**{"data": "task:json_extract", field: value})
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, (field, value)
            assert err.value.details().startswith(f"{field}: "), err.value.details()
            answers.add(err.value.details())
        assert len(answers) == 1, answers  # existing and missing outside paths: the same answer
    assert not Path("/tmp/pwn").exists() and not (work / "new").exists()


def test_publish_goes_only_to_configured_servers_and_roots(tuner: tuple[TuningClient, Path]) -> None:
    client, work = tuner
    for spec, field in [
        (pb.PublishSpec(server="127.0.0.1:50051", name="x"), "publish.server"),  # an address, not a name
        (pb.PublishSpec(server="elsewhere", name="x"), "publish.server"),
        (pb.PublishSpec(server="nowhere", name="x", adapter_root="/tmp/pwnroot"), "publish.adapter_root"),
        (pb.PublishSpec(server="nowhere", name="x", adapter_root="/nonexistent"), "publish.adapter_root"),
        (pb.PublishSpec(server="nowhere", name="x", adapter_root="../data"), "publish.adapter_root"),
    ]:
        with pytest.raises(grpc.RpcError) as err:
            client.submit(method="lora", data="task:json_extract", publish=spec)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert err.value.details().startswith(f"{field}: "), err.value.details()
    assert not Path("/tmp/pwnroot").exists()
    # a configured name and an in-root folder pass the publish checks: the refusal is the data's
    (work / "data" / "empty.jsonl").write_text("")
    for root in ("", "team", str(work / "adapters" / "team")):
        with pytest.raises(grpc.RpcError) as err:
            client.submit(
                method="lora",
                data="empty.jsonl",
                publish=pb.PublishSpec(server="nowhere", name="ok", adapter_root=root),
            )
        assert err.value.details() == f"{work / 'data' / 'empty.jsonl'}: no records"
    assert not list((work / "adapters").rglob("*"))


def test_bad_submissions_get_clear_statuses(tuner: tuple[TuningClient, Path]) -> None:
    client, work = tuner
    tmp_path = work / "data"
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
            publish=pb.PublishSpec(server="nowhere", name="x"),
        )
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "publish:" in err.value.details()
    with pytest.raises(grpc.RpcError) as err:
        client.submit(method="lora", data="task:json_extract", output_dir=str(work / "out"))
    assert err.value.code() == grpc.StatusCode.ALREADY_EXISTS
    for call in (client.cancel, lambda j: list(client.watch(j))):
        with pytest.raises(grpc.RpcError) as err:
            call("nope")
        assert err.value.code() == grpc.StatusCode.NOT_FOUND


def test_cancel_stops_training_and_leaves_no_output(tuner: tuple[TuningClient, Path]) -> None:
    client, work = tuner
    tmp_path = work / "out" / "cancel"
    tmp_path.mkdir()
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
