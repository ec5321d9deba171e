"""CLIENT spans for the Python client, with the W3C trace context sent in gRPC metadata.

Active only when a tracer provider is configured (passed in, or installed globally by the process);
otherwise `call_span` yields no metadata and costs nothing. We propagate by hand rather than through
the instrumentation's channel interceptor because its sync stream wrapper returns a generator without
`cancel()`, and the client must be able to cancel a stream it stops reading.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import grpc
from opentelemetry import propagate, trace
from opentelemetry.trace import SpanKind, Status, StatusCode

Metadata = tuple[tuple[str, str], ...]


def configured_tracer(provider: trace.TracerProvider | None) -> trace.Tracer | None:
    """A tracer when `provider` is given or the process installed a global one; else None."""
    if provider is None:
        provider = trace.get_tracer_provider()
        if isinstance(provider, (trace.ProxyTracerProvider, trace.NoOpTracerProvider)):
            return None
    return provider.get_tracer("effllm.client")


@contextmanager
def call_span(tracer: trace.Tracer | None, method: str, target: str) -> Iterator[Metadata | None]:
    """A CLIENT span named like the instrumentation's (`effllm.v1.GenerationService/GenerateStream`)
    around one call; yields the metadata that carries its context (None without a tracer)."""
    if tracer is None:
        yield None
        return
    service, _, name = method.rpartition("/")
    host, _, port = target.rpartition(":")
    attrs: dict[str, str | int] = {
        "rpc.system": "grpc",
        "rpc.service": service,
        "rpc.method": name,
        "server.address": host or target,
    }
    if port.isdigit():
        attrs["server.port"] = int(port)
    # Not made current: an async generator may be resumed in another context, and detaching a
    # context there fails. The span's parent is whatever span is current when the call starts.
    span = tracer.start_span(method, kind=SpanKind.CLIENT, attributes=attrs)
    carrier: dict[str, str] = {}
    propagate.inject(carrier, context=trace.set_span_in_context(span))
    try:
        yield tuple(carrier.items())
    except grpc.RpcError as err:
        code = err.code() if hasattr(err, "code") else None
        if isinstance(code, grpc.StatusCode):
            span.set_attribute("rpc.grpc.status_code", code.value[0])
            span.set_status(Status(StatusCode.ERROR, f"{code.name}: {getattr(err, 'details', lambda: '')()}"))
        raise
    else:
        span.set_attribute("rpc.grpc.status_code", 0)
    finally:
        span.end()
