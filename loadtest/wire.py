"""What one Locust request sends, how, and what its row keeps from the reply (the wire side of user.py).

`generate_request` turns a RequestSpec into the GenerateRequest: effllm's `build_request` for prompt and
sampling, then the objective and budget set on the message itself (so the campaign needs no client
keyword for them, and speaks to any server of the same proto). `Caller` sends it over a
GenerationService stub inside a CLIENT span whose W3C context rides in the call's metadata
(client/tracing.py, as EffllmClient does), so the server's request span shares the Locust request's trace
id. `reply_fields` reads the final message, a GenerateResponse or a StreamFinal alike.

No locust import: tested without it. Invariant: a field the server left unset is recorded as None, never
as 0 or "" (an older server that fills no `variant` or `usage.energy_joules` leaves them None).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import grpc
from opentelemetry.trace import Tracer

from ..api.objectives import objective_value
from ..api.v1 import generation_pb2 as pb
from ..api.v1 import generation_pb2_grpc as pb_grpc
from ..client import build_request
from ..client.tracing import call_span
from .workload import RequestSpec, Workload

GENERATE = "effllm.v1.GenerationService/Generate"
STREAM = "effllm.v1.GenerationService/GenerateStream"


def generate_request(spec: RequestSpec, workload: Workload, request_id: str) -> pb.GenerateRequest:
    p = spec.prompt
    req = build_request(
        p.prompt,
        messages=list(p.messages) if p.messages else None,
        adapter=spec.adapter,
        max_new_tokens=spec.max_new_tokens,
        temperature=workload.temperature,
        ignore_eos=workload.ignore_eos,
        request_id=request_id,
        model=spec.model or None,
    )
    if spec.objective:
        req.objective = objective_value(spec.objective)
    budget = workload.budget.fields() if workload.budget is not None else {}
    if budget:  # an empty Budget message would still be "set" on the wire
        req.budget.CopyFrom(pb.Budget(**budget))
    return req


class Caller:
    """One target's GenerationService calls, each in a CLIENT span (none without a tracer)."""

    def __init__(self, channel: grpc.Channel, target: str, tracer: Tracer | None, timeout_s: float) -> None:
        self._stub = pb_grpc.GenerationServiceStub(channel)
        self.target = target
        self._tracer = tracer
        self.timeout_s = timeout_s

    def stream(self, req: pb.GenerateRequest) -> Iterator[pb.GenerateStreamResponse]:
        """The chunks as they come; closing the iterator (or the greenlet being killed) cancels the call."""
        with call_span(self._tracer, STREAM, self.target) as md:
            call = self._stub.GenerateStream(req, timeout=self.timeout_s, metadata=md)
            try:
                yield from call
            finally:
                call.cancel()

    def generate(self, req: pb.GenerateRequest) -> pb.GenerateResponse:
        with call_span(self._tracer, GENERATE, self.target) as md:
            reply: pb.GenerateResponse = self._stub.Generate(req, timeout=self.timeout_s, metadata=md)
            return reply


def reply_fields(final: pb.GenerateResponse | pb.StreamFinal) -> dict[str, Any]:
    """A request row's server-side fields, from the final message (unary reply or the stream's last)."""
    t, u = final.timings, final.usage
    return {
        "input_tokens": u.input_tokens,
        "finish": int(final.finish_reason),
        "served_adapter": final.adapter,
        "server_ttft_s": t.time_to_first_token_s,
        "server_queue_s": t.queue_s,
        "server_total_s": t.total_s,
        "variant": final.variant or None,
        "replica": final.replica or None,  # through a cluster front (effllm serve --replicas)
        "served_model": final.model or None,
        "budget_met": bool(final.budget_met) if final.HasField("budget_met") else None,
        "usage_energy_j": float(u.energy_joules) if u.HasField("energy_joules") else None,
        "usage_energy_source": u.energy_source or None,
    }
