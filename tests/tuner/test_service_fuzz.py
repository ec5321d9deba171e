"""Hypothesis fuzzing of TuningService against a real loopback grpc.aio server (token auth on): >= 2,000
generated calls per run with random TuneConfig fields (types, sizes, paths in and out of the roots,
NaN/inf/huge numbers), publish specs and job ids.

Every answer is OK or a documented refusal, never UNKNOWN / INTERNAL; an accepted job is cancelled at once;
no file appears outside the roots; health is SERVING afterwards. Fast: the server runs in this process on
its own event loop, and its JobManager has no running slot (`max_running=0`), so an accepted job stays
queued until its cancel — nothing trains (the real worker path is covered by test_service.py).
"""

from __future__ import annotations

import string
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from effllm.api.v1 import tuning_pb2 as pb
from effllm.api.v1 import tuning_pb2_grpc as pb_grpc
from effllm.common.auth import AuthConfig
from effllm.tuner.limits import TunerLimits

from .inprocess import InProcessTuner

ADMIN = "fuzz-admin-token-0123456789"
EXAMPLES = 2000
ALLOWED = {"OK", "INVALID_ARGUMENT", "ALREADY_EXISTS", "NOT_FOUND", "FAILED_PRECONDITION"}
INT32 = st.integers(-(2**31), 2**31 - 1)
DOUBLES = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([0.0, -0.0, 1e-300, 1e308, -1e308, 0.5, 16.0, 2e-4]),
)
_SMALL_PATHS = st.one_of(
    st.text(max_size=40),
    st.text(alphabet=string.ascii_letters + "./~\\:-_\x00\n ", max_size=80),
    st.sampled_from(
        [
            "/etc/shadow",
            "/etc/passwd",
            "/etc",
            "/nonexistent",
            "/tmp/fuzz-pwn",
            "../x",
            "../../etc/passwd",
            "~",
            "~/x",
            ".",
            "train.jsonl",
            "bad.jsonl",
            "link.jsonl",
            "task:json_extract",
            "task:nope",
            "hf:x",
            "sub/new",
        ]
    ),
)
# One path in eight is long (up to 70,000 characters: past PATH_MAX and the status-message size).
PATHS = st.one_of(*[_SMALL_PATHS] * 7, st.integers(1000, 70_000).map(lambda n: "a/" * (n // 2)))
STRINGS = st.one_of(st.text(max_size=30), st.sampled_from(["lora", "dora", "full", "fp32", "bf16", "cosine"]))


@st.composite
def tune_configs(draw: st.DrawFn) -> pb.TuneConfig:
    """Each field set or not; one in two configs starts from a valid one so that enough get accepted."""
    msg = pb.TuneConfig()
    if draw(st.booleans()):
        msg.data, msg.max_steps = "task:json_extract", 1
    chosen = draw(
        st.sets(st.sampled_from(list(pb.TuneConfig.DESCRIPTOR.fields)), max_size=8)
    )  # the rest: default
    for fd in sorted(chosen, key=lambda f: f.number):
        if fd.name in ("data", "eval_data", "model", "output_dir"):
            setattr(msg, fd.name, draw(PATHS))
        elif fd.type == fd.TYPE_STRING and fd.name == "target_modules":
            msg.target_modules.extend(draw(st.lists(STRINGS, max_size=5)))
        elif fd.type == fd.TYPE_STRING:
            setattr(msg, fd.name, draw(STRINGS))
        elif fd.type == fd.TYPE_DOUBLE:
            setattr(msg, fd.name, draw(DOUBLES))
        elif fd.type == fd.TYPE_BOOL:
            setattr(msg, fd.name, draw(st.booleans()))
        elif fd.name == "layers":
            msg.layers.extend(draw(st.lists(INT32, max_size=4)))
        else:
            setattr(msg, fd.name, draw(st.one_of(INT32, st.integers(-2, 64))))
    return msg


publish_specs = st.one_of(
    st.none(),
    st.builds(
        pb.PublishSpec,
        server=st.one_of(st.sampled_from(["local", "127.0.0.1:50051", ""]), st.text(max_size=20)),
        name=st.one_of(st.sampled_from(["ok", "a@1", "../x", ""]), st.text(max_size=20)),
        adapter_root=PATHS,
    ),
)


@pytest.fixture(scope="module")
def tuner(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[InProcessTuner, grpc.Channel]]:
    root = tmp_path_factory.mktemp("fuzz-tuner")
    for name in ("data", "out", "adapters", "out/sub"):
        (root / name).mkdir()
    (root / "data" / "train.jsonl").write_text('{"prompt": "a", "response": "b"}\n' * 4)
    (root / "data" / "bad.jsonl").write_text('{"prompt": "a"}\n[[[[\n')
    (root / "data" / "link.jsonl").symlink_to("/etc/passwd")
    # no running slot: an accepted job stays queued until its cancel; every one is kept for the final check
    limits = TunerLimits(max_running=0, max_jobs=10, max_finished_jobs=10 * EXAMPLES)
    tuner = InProcessTuner(root, limits, auth=AuthConfig((("admin", ADMIN),)))
    channel = grpc.insecure_channel(f"127.0.0.1:{tuner.port}")
    try:
        yield tuner, channel
    finally:
        channel.close()
        tuner.close()


CODES: Counter[str] = Counter()
MD = (("authorization", f"Bearer {ADMIN}"),)


def _code(call: object) -> str:
    try:
        call()  # type: ignore[operator]
        return "OK"
    except grpc.RpcError as err:
        code = err.code().name  # type: ignore[attr-defined]
        assert code in ALLOWED, (code, err.details())  # type: ignore[attr-defined]
        return str(code)


@settings(
    max_examples=EXAMPLES,
    deadline=None,
    database=None,
    suppress_health_check=[
        HealthCheck.function_scoped_fixture,
        HealthCheck.too_slow,
        HealthCheck.data_too_large,
    ],
)
# One case in eight also probes WatchJob/CancelJob with a random job id.
@given(config=tune_configs(), publish=publish_specs, job_id=st.one_of(*[st.none()] * 7, st.text(max_size=20)))
def test_tuning_service_never_answers_unknown_or_internal(
    tuner: tuple[InProcessTuner, grpc.Channel],
    config: pb.TuneConfig,
    publish: pb.PublishSpec | None,
    job_id: str | None,
) -> None:
    _, channel = tuner
    stub = pb_grpc.TuningServiceStub(channel)
    request = pb.SubmitJobRequest(config=config)
    if publish is not None:
        request.publish.CopyFrom(publish)
    box: dict[str, pb.JobInfo] = {}

    def submit() -> None:
        box["job"] = stub.SubmitJob(request, metadata=MD, timeout=30)

    code = _code(submit)
    CODES[code] += 1
    if code == "OK":  # accepted: cancel it at once (it is queued: no slot runs jobs here)
        info = stub.CancelJob(pb.CancelJobRequest(job_id=box["job"].job_id), metadata=MD, timeout=30)
        assert info.state == pb.JOB_STATE_CANCELLED
        events = list(stub.WatchJob(pb.WatchJobRequest(job_id=info.job_id), metadata=MD, timeout=30))
        assert events[-1].state == pb.JOB_STATE_CANCELLED
    if job_id is not None:
        watch = pb.WatchJobRequest(job_id=job_id)
        CODES["watch:" + _code(lambda: list(stub.WatchJob(watch, metadata=MD, timeout=30)))] += 1
        cancel = pb.CancelJobRequest(job_id=job_id)
        CODES["cancel:" + _code(lambda: stub.CancelJob(cancel, metadata=MD, timeout=30))] += 1


def test_after_the_fuzz_the_tuner_is_healthy_and_nothing_escaped(
    tuner: tuple[InProcessTuner, grpc.Channel],
) -> None:
    server, channel = tuner
    assert sum(CODES[c] for c in ALLOWED) >= EXAMPLES, CODES  # the fuzz above ran in this session
    assert CODES["OK"] >= 50 and CODES["INVALID_ARGUMENT"] >= 500, CODES  # both paths were exercised
    health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
    assert health.status == health_pb2.HealthCheckResponse.SERVING
    jobs = pb_grpc.TuningServiceStub(channel).ListJobs(pb.ListJobsRequest(), metadata=MD, timeout=30).jobs
    assert len(jobs) == CODES["OK"] and all(j.state == pb.JOB_STATE_CANCELLED for j in jobs)
    assert not Path("/tmp/fuzz-pwn").exists()
    assert not list((server.root / "adapters").iterdir()) and not (server.root / "jobs").exists()
