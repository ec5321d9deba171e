"""TuningClient: submit, watch, cancel and list fine-tuning jobs on an `effllm tuner serve` process."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from ..api.v1 import tuning_pb2 as pb
from ..api.v1 import tuning_pb2_grpc as pb_grpc
from .channel import ClientSecurity, make_channel


def tune_config(**fields: Any) -> pb.TuneConfig:
    """TuneConfig keys as keyword arguments (tuples/lists for repeated fields)."""
    values: dict[str, Any] = {k: list(v) if isinstance(v, tuple) else v for k, v in fields.items()}
    return pb.TuneConfig(**values)


class TuningClient:
    def __init__(
        self,
        target: str = "127.0.0.1:50061",
        *,
        timeout: float | None = 60.0,
        security: ClientSecurity | None = None,
    ) -> None:
        """`security`: TLS and the admin token a tuner with auth needs (see docs/security.md)."""
        self.target = target
        self.channel, _ = make_channel(target, security)
        self.timeout = timeout
        self._stub = pb_grpc.TuningServiceStub(self.channel)

    def submit(
        self, config: pb.TuneConfig | None = None, *, publish: pb.PublishSpec | None = None, **fields: Any
    ) -> pb.JobInfo:
        request = pb.SubmitJobRequest(config=config or tune_config(**fields))
        if publish is not None:
            request.publish.CopyFrom(publish)
        return self._stub.SubmitJob(request, timeout=self.timeout)

    def watch(self, job_id: str, *, timeout: float | None = None) -> Iterator[pb.JobEvent]:
        """Events from the job's start; ends after the terminal one. Closing the iterator cancels the call."""
        call = self._stub.WatchJob(pb.WatchJobRequest(job_id=job_id), timeout=timeout)
        try:
            yield from call
        finally:
            call.cancel()

    def cancel(self, job_id: str) -> pb.JobInfo:
        return self._stub.CancelJob(pb.CancelJobRequest(job_id=job_id), timeout=self.timeout)

    def list(self) -> list[pb.JobInfo]:
        return list(self._stub.ListJobs(pb.ListJobsRequest(), timeout=self.timeout).jobs)

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> TuningClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
