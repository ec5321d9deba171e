"""TuningService over gRPC (grpc.aio) in the tuner's own process; the jobs themselves run in child processes.

Validation happens here, before a job exists: room for it (RESOURCE_EXHAUSTED past `--max-jobs`), the config
(TuneConfig, then the tuner's bounds on its sizes, limits.py: INVALID_ARGUMENT naming the field), every path
confined to its root (policy.py), the output dir (ALREADY_EXISTS), the publish spec (a server named in the
tuner's configuration), and JSONL data files line by line. No torch is imported.
Invariant: with a token configured, no RPC but health and reflection runs without the admin role
(common/auth.py's interceptor); no file outside the roots is read or written on a caller's behalf.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import signal
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer
from grpc_reflection.v1alpha import reflection

from effllm.api.errors import EffllmError
from effllm.api.status import grpc_status
from effllm.api.v1 import tuning_pb2 as pb
from effllm.api.v1 import tuning_pb2_grpc as pb_grpc
from effllm.common.auth import AuthConfig, AuthInterceptor, TlsConfig

from . import data, events
from .config import ConfigError, TuneConfig
from .events import CancelledEvent, DoneEvent, ErrorEvent, PhaseEvent, ProgressEvent, Record, StagingEvent
from .jobs import CANCELLED, FAILED, QUEUED, RUNNING, SUCCEEDED, TERMINAL, Job, JobManager
from .limits import TunerLimits
from .policy import TunerPolicy

log = logging.getLogger("effllm.tuner.service")

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["TuningService"].full_name
_STATES = {
    QUEUED: pb.JOB_STATE_QUEUED,
    RUNNING: pb.JOB_STATE_RUNNING,
    SUCCEEDED: pb.JOB_STATE_SUCCEEDED,
    FAILED: pb.JOB_STATE_FAILED,
    CANCELLED: pb.JOB_STATE_CANCELLED,
}


def config_from_proto(msg: pb.TuneConfig) -> TuneConfig:
    """Set fields only: proto3 `optional` scalars by presence, strings and lists when non-empty."""
    raw: dict[str, Any] = {}
    for fd, value in msg.ListFields():
        # Repeated fields come as containers (FieldDescriptor.label is gone in protobuf 7's upb).
        raw[fd.name] = value if isinstance(value, (str, bytes, int, float, bool)) else list(value)
    return TuneConfig.from_dict(raw)


class TuningService(pb_grpc.TuningServiceServicer):
    def __init__(
        self, manager: JobManager, policy: TunerPolicy, publish_tls: dict[str, str] | None = None
    ) -> None:
        self.manager = manager
        self.policy = policy
        self.publish_tls = publish_tls or {}  # tls_ca/tls_cert/tls_key of the tuner's own client side

    def _job(self, job_id: str) -> Job:
        job = self.manager.jobs.get(job_id)
        if job is None:
            raise KeyError(job_id)
        return job

    async def _find(self, job_id: str, context: grpc.aio.ServicerContext) -> Job:
        if not job_id:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "job_id: required")
        job = self.manager.jobs.get(job_id)
        if job is None:
            await context.abort(grpc.StatusCode.NOT_FOUND, _capped(f"job_id: no job {job_id!r}"))
        assert job is not None
        return job

    async def SubmitJob(self, request: pb.SubmitJobRequest, context: grpc.aio.ServicerContext) -> pb.JobInfo:
        try:
            self.manager.check_capacity()  # before any work; submit() checks again, atomically
            config = config_from_proto(request.config)
            self.manager.limits.check_job(config)
            config = self.policy.confine_job(config)
            publish = None
            if request.HasField("publish"):
                from .worker import PublishTarget

                if not config.is_lora_family:
                    raise ConfigError(
                        f"publish: method {config.method} makes a full checkpoint, not an adapter"
                    )
                server = self.policy.server(request.publish.server)
                root = self.policy.confine_adapter_root(request.publish.adapter_root)
                target = PublishTarget(server.address, request.publish.name, str(root), **self.publish_tls)
                publish = {"server": target.server, "name": target.name, "adapter_root": target.adapter_root}
                publish.update(self.publish_tls)
            await asyncio.to_thread(_check_data, config)
        except EffllmError as exc:
            await context.abort(grpc_status(exc.code), exc.message)
        except (ConfigError, data.DataError, ValueError, OSError, RecursionError) as exc:
            # ValueError covers PathRefused and UnicodeDecodeError; OSError: a file inside the root that
            # cannot be read. A caller's string can be megabytes: the status message is capped.
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, _capped(str(exc)))
        if config.output_dir and Path(config.output_dir).exists():
            await context.abort(
                grpc.StatusCode.ALREADY_EXISTS, _capped(f"output_dir: {config.output_dir} already exists")
            )
        try:
            job = self.manager.submit(config, publish)
        except EffllmError as exc:  # another SubmitJob took the last place while this one was checked
            await context.abort(grpc_status(exc.code), exc.message)
        log.info("job %s: %s on %s", job.id, config.method, config.data)
        return job_info(job)

    async def WatchJob(
        self, request: pb.WatchJobRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.JobEvent]:
        job = await self._find(request.job_id, context)
        async for record in self.manager.watch(job):
            yield job_event(job.id, record)

    async def CancelJob(self, request: pb.CancelJobRequest, context: grpc.aio.ServicerContext) -> pb.JobInfo:
        job = await self._find(request.job_id, context)
        if job.state in TERMINAL:
            await context.abort(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"job_id: job {job.id} already {job.state}; nothing to cancel",
            )
        await self.manager.cancel(job)
        await self.manager.wait_terminal(job)
        return job_info(job)

    async def ListJobs(
        self, request: pb.ListJobsRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListJobsResponse:
        return pb.ListJobsResponse(jobs=[job_info(j) for j in self.manager.jobs.values()])


def _capped(message: str, limit: int = 1024) -> str:
    """gRPC carries the message in trailing metadata (8 KiB by default): a longer one fails the call."""
    return message if len(message) <= limit else message[:limit] + " ..."


def _check_data(config: TuneConfig) -> None:
    """JSONL files are read and validated now, so a malformed line is the submitter's error, not a job's."""
    for spec in (config.data, config.eval_data):
        if spec and not spec.startswith(("task:", "hf:")):
            data.read_jsonl(Path(spec))
    if config.data.startswith("task:"):
        from .tasks import TASKS

        if config.data[5:] not in TASKS:
            raise ConfigError(
                f"data: unknown task {config.data[5:]!r} (built-in: {', '.join(sorted(TASKS))})"
            )


def job_info(job: Job) -> pb.JobInfo:
    return pb.JobInfo(
        job_id=job.id,
        state=_STATES[job.state],
        method=job.config.method,
        data=job.config.data,
        step=job.step,
        total_steps=job.total_steps,
        loss=job.loss,
        output_dir=job.output_dir,
        published=job.published,
        error=job.error,
        created_unix=job.created,
        finished_unix=job.finished,
    )


def job_event(job_id: str, record: Record) -> pb.JobEvent:
    msg = pb.JobEvent(job_id=job_id, state=_STATES[record.state], time_unix=record.time)
    event = record.event
    if isinstance(event, ProgressEvent):
        # the proto carries the progress figures; the step's time breakdown stays in the JSON events
        fields = {
            k: v for k, v in dataclasses.asdict(event).items() if k in pb.Progress.DESCRIPTOR.fields_by_name
        }
        msg.progress.CopyFrom(pb.Progress(**fields))
    elif isinstance(event, PhaseEvent):
        msg.phase = event.phase
    elif isinstance(event, DoneEvent):
        msg.metrics_json = json.dumps({**events.to_dict(event), "state": record.state, "time": record.time})
    elif isinstance(event, ErrorEvent):
        msg.error = event.error
    elif isinstance(event, CancelledEvent):
        msg.phase = "cancelled"
    elif isinstance(event, StagingEvent):
        msg.phase = "saving"
    return msg


async def start_server(
    host: str,
    port: int,
    manager: JobManager,
    policy: TunerPolicy,
    *,
    auth: AuthConfig | None = None,
    tls: TlsConfig | None = None,
    publish_tls: dict[str, str] | None = None,
) -> tuple[grpc.aio.Server, int, HealthServicer]:
    """A started TuningService server (with health and reflection) and the port it bound."""
    auth = auth or AuthConfig()
    interceptors = [AuthInterceptor(auth)] if auth.enabled else []
    server = grpc.aio.server(interceptors=interceptors)
    pb_grpc.add_TuningServiceServicer_to_server(TuningService(manager, policy, publish_tls), server)
    health = HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    reflection.enable_server_reflection(
        (SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME),
        server,
    )
    address = f"{host}:{port}"
    bound = server.add_secure_port(address, tls.credentials()) if tls else server.add_insecure_port(address)
    if bound == 0:
        raise RuntimeError(f"could not bind {host}:{port}")
    await server.start()
    for name in ("", SERVICE_NAME):
        await health.set(name, health_pb2.HealthCheckResponse.SERVING)
    log.info(
        "TuningService on %s:%d (%s%s); data root %s, output root %s, adapter root %s",
        host,
        bound,
        ("mutual TLS" if tls.client_ca else "TLS") if tls else "plaintext",
        ", bearer-token auth" if auth.enabled else "",
        policy.data_root,
        policy.output_root,
        policy.adapter_root or "none (publishing off)",
    )
    return server, bound, health


async def serve(
    host: str,
    port: int,
    policy: TunerPolicy,
    *,
    limits: TunerLimits | None = None,
    log_dir: str = "runs/tuner",
    auth: AuthConfig | None = None,
    tls: TlsConfig | None = None,
    publish_tls: dict[str, str] | None = None,
    worker_env: dict[str, str] | None = None,
    ready: asyncio.Event | None = None,
) -> None:
    """Run until SIGTERM/SIGINT; running jobs are cancelled (and leave nothing) on the way out."""
    manager = JobManager(Path(log_dir), limits, worker_env=worker_env)
    server, _, _ = await start_server(
        host, port, manager, policy, auth=auth, tls=tls, publish_tls=publish_tls
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    if ready is not None:
        ready.set()
    await stop.wait()
    log.info(
        "stopping: cancelling %d unfinished jobs", sum(j.state not in TERMINAL for j in manager.jobs.values())
    )
    await manager.shutdown()
    await server.stop(grace=1.0)
