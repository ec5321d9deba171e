"""OTLP/JSON lines written by the real SDK and read back; the lines parse as ExportTraceServiceRequest."""

from __future__ import annotations

import base64
import json
from pathlib import Path

from google.protobuf import json_format
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.trace import SpanKind, StatusCode

from effllm.telemetry.otlpjson import SPAN_KIND_SERVER, STATUS_ERROR, OtlpJsonFileExporter, read_spans


def _write(path: Path) -> tuple[str, str, str]:
    provider = TracerProvider(resource=Resource.create({"service.name": "t"}))
    provider.add_span_processor(SimpleSpanProcessor(OtlpJsonFileExporter(path)))
    tracer = provider.get_tracer("test")
    with tracer.start_as_current_span("parent", kind=SpanKind.CLIENT) as parent:
        with tracer.start_as_current_span(
            "generate m",
            kind=SpanKind.SERVER,
            attributes={
                "s": "x",
                "i": 7,
                "f": 0.25,
                "b": True,
                "arr": ["length"],
            },
        ) as child:
            child.set_status(StatusCode.ERROR, "RESOURCE_EXHAUSTED: busy")
            child.add_event("first_token", {"n": 1})
    provider.shutdown()
    ctx, cctx = parent.get_span_context(), child.get_span_context()
    return f"{ctx.trace_id:032x}", f"{ctx.span_id:016x}", f"{cctx.span_id:016x}"


def test_round_trip(tmp_path: Path) -> None:
    path = tmp_path / "t.jsonl"
    trace_id, parent_id, child_id = _write(path)
    spans = {s.name: s for s in read_spans(path)}
    child = spans["generate m"]
    assert child.trace_id == trace_id and child.span_id == child_id and child.parent_span_id == parent_id
    assert child.kind == SPAN_KIND_SERVER
    assert child.attributes == {"s": "x", "i": 7, "f": 0.25, "b": True, "arr": ["length"]}
    assert child.status_code == STATUS_ERROR and child.status_message == "RESOURCE_EXHAUSTED: busy"
    assert child.events == (("first_token", {"n": 1}),)
    assert child.resource["service.name"] == "t" and child.scope == "test"
    assert child.end_ns >= child.start_ns > 0
    assert spans["parent"].parent_span_id == ""


def test_lines_are_otlp_json(tmp_path: Path) -> None:
    path = tmp_path / "t.jsonl"
    trace_id, _, _ = _write(path)
    lines = path.read_text().splitlines()
    assert len(lines) == 2  # SimpleSpanProcessor: one export (one line) per span
    for line in lines:
        raw = json.loads(line)
        span = raw["resourceSpans"][0]["scopeSpans"][0]["spans"][0]
        assert span["traceId"] == trace_id  # hex ids, as the OTLP/JSON spec requires
        assert isinstance(span["kind"], int) and isinstance(span["startTimeUnixNano"], str)
        # hex -> base64 gives protobuf's canonical JSON, which must parse into the real message
        for key in ("traceId", "spanId", "parentSpanId"):
            if key in span:
                span[key] = base64.b64encode(bytes.fromhex(span[key])).decode()
        msg = json_format.ParseDict(raw, ExportTraceServiceRequest())
        assert msg.resource_spans[0].scope_spans[0].spans[0].trace_id.hex() == trace_id


def test_torn_last_line_is_skipped(tmp_path: Path) -> None:
    path = tmp_path / "t.jsonl"
    _write(path)
    text = path.read_text()
    path.write_text(text + text.splitlines()[0][:50])
    assert len(read_spans(path)) == 2
