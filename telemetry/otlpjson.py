"""OTLP/JSON lines: a span exporter that writes them and a reader that parses them back.

Each line is one ExportTraceServiceRequest in the OTLP/JSON encoding, as the OpenTelemetry Collector's
file exporter writes it: lowerCamelCase field names, enums as integers, 64-bit integers as strings, and
trace/span ids as lowercase hex (not base64, unlike protobuf's canonical JSON). So a collector
(`otlpjsonfile` receiver) or any OTLP tool can read our files, and we can read theirs.
Invariant: a line is written whole and flushed per export batch; the reader skips a torn last line.
The file is rotated to `PATH.1` past its byte cap (telemetry/jsonlines.py) and `read_spans` reads both.
"""

from __future__ import annotations

import base64
import json
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from google.protobuf import json_format
from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult

from .jsonlines import DEFAULT_MAX_BYTES, RotatingLines, generations

_ID_FIELDS = ("traceId", "spanId", "parentSpanId")

SPAN_KIND_SERVER = 2
SPAN_KIND_CLIENT = 3
STATUS_ERROR = 2


def _ids_to_hex(node: Any) -> None:
    if isinstance(node, dict):
        for key, value in node.items():
            if key in _ID_FIELDS and isinstance(value, str):
                node[key] = base64.b64decode(value).hex()
            else:
                _ids_to_hex(value)
    elif isinstance(node, list):
        for item in node:
            _ids_to_hex(item)


def to_otlp_json(spans: Sequence[ReadableSpan]) -> str:
    """One ExportTraceServiceRequest as a single OTLP/JSON line (no newline)."""
    as_dict = json_format.MessageToDict(encode_spans(spans), use_integers_for_enums=True)
    _ids_to_hex(as_dict)
    return json.dumps(as_dict, separators=(",", ":"))


class OtlpJsonFileExporter(SpanExporter):
    """Appends one OTLP/JSON line per export batch to `path` (parents are created); past `max_bytes`
    (0: no cap) the file is rotated to PATH.1."""

    def __init__(self, path: Path, max_bytes: int = DEFAULT_MAX_BYTES) -> None:
        self.path = Path(path)
        self._file = RotatingLines(self.path, max_bytes)
        self._lock = threading.Lock()

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        line = to_otlp_json(spans)
        with self._lock:
            if self._file.closed:
                return SpanExportResult.FAILURE
            self._file.write(line)
        return SpanExportResult.SUCCESS

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        with self._lock:
            self._file.flush()
        return True

    def shutdown(self) -> None:
        with self._lock:
            self._file.close()


@dataclass(frozen=True)
class SpanRecord:
    """A span read back from OTLP/JSON, with attributes as plain Python values."""

    trace_id: str
    span_id: str
    parent_span_id: str
    name: str
    kind: int
    start_ns: int
    end_ns: int
    attributes: dict[str, Any] = field(default_factory=dict)
    status_code: int = 0
    status_message: str = ""
    events: tuple[tuple[str, dict[str, Any]], ...] = ()
    resource: dict[str, Any] = field(default_factory=dict)
    scope: str = ""

    @property
    def duration_s(self) -> float:
        return (self.end_ns - self.start_ns) / 1e9


def any_value(value: dict[str, Any]) -> Any:
    """Decode an OTLP AnyValue dict."""
    if "stringValue" in value:
        return value["stringValue"]
    if "intValue" in value:
        return int(value["intValue"])
    if "doubleValue" in value:
        return float(value["doubleValue"])
    if "boolValue" in value:
        return bool(value["boolValue"])
    if "arrayValue" in value:
        return [any_value(v) for v in value["arrayValue"].get("values", [])]
    if "kvlistValue" in value:
        return attributes(value["kvlistValue"].get("values", []))
    if "bytesValue" in value:
        return base64.b64decode(value["bytesValue"])
    return None


def attributes(kvs: list[dict[str, Any]]) -> dict[str, Any]:
    return {kv["key"]: any_value(kv.get("value", {})) for kv in kvs}


def spans_from_request(request: dict[str, Any]) -> Iterator[SpanRecord]:
    """The spans of one ExportTraceServiceRequest in OTLP/JSON form (ids in hex)."""
    for rs in request.get("resourceSpans", []):
        resource = attributes(rs.get("resource", {}).get("attributes", []))
        for ss in rs.get("scopeSpans", []):
            scope = ss.get("scope", {}).get("name", "")
            for sp in ss.get("spans", []):
                status = sp.get("status", {})
                yield SpanRecord(
                    trace_id=sp.get("traceId", ""),
                    span_id=sp.get("spanId", ""),
                    parent_span_id=sp.get("parentSpanId", ""),
                    name=sp.get("name", ""),
                    kind=int(sp.get("kind", 0)),
                    start_ns=int(sp.get("startTimeUnixNano", 0)),
                    end_ns=int(sp.get("endTimeUnixNano", 0)),
                    attributes=attributes(sp.get("attributes", [])),
                    status_code=int(status.get("code", 0)),
                    status_message=status.get("message", ""),
                    events=tuple(
                        (ev.get("name", ""), attributes(ev.get("attributes", [])))
                        for ev in sp.get("events", [])
                    ),
                    resource=resource,
                    scope=scope,
                )


def read_spans(path: Path) -> list[SpanRecord]:
    """All spans in an OTLP/JSON lines file, after those in its rotated PATH.1 (when there is one); a torn
    (half-written) last line is skipped."""
    out: list[SpanRecord] = []
    for part in generations(Path(path)) or [Path(path)]:  # none: read PATH for its own error
        lines = part.read_text(encoding="utf-8").splitlines()
        for i, line in enumerate(lines):
            if not line.strip():
                continue
            try:
                request = json.loads(line)
            except json.JSONDecodeError:
                if i == len(lines) - 1:
                    break
                raise ValueError(f"{part}:{i + 1}: not an OTLP/JSON line") from None
            out.extend(spans_from_request(request))
    return out
