"""Read server traces written as OTLP/JSON lines and join them to the load test's requests.

Format (the OTLP/JSON encoding of ExportTraceServiceRequest, one per line):
resourceSpans[] -> scopeSpans[] -> spans[] {traceId, spanId, parentSpanId, name, kind, startTimeUnixNano,
endTimeUnixNano, attributes[] {key, value {stringValue|intValue|doubleValue|boolValue}}, status}.
We keep the server's request spans (name `generate ...`, SERVER kind when given) and join them to client
rows by trace id (the Locust user propagates W3C trace context), falling back to the request id.
Invariant: the join never invents numbers: a request without a span just has no server figures.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..telemetry.jsonlines import generations

_SPAN_KIND_SERVER = (2, "SPAN_KIND_SERVER")


def _value(v: dict[str, Any]) -> Any:
    if "stringValue" in v:
        return v["stringValue"]
    if "intValue" in v:
        return int(v["intValue"])  # int64 is a JSON string in OTLP/JSON
    if "doubleValue" in v:
        return float(v["doubleValue"])
    if "boolValue" in v:
        return bool(v["boolValue"])
    if "arrayValue" in v:
        return [_value(x) for x in v["arrayValue"].get("values", [])]
    return None


@dataclass(frozen=True)
class ServerSpan:
    trace_id: str
    span_id: str
    name: str
    start_s: float  # unix seconds
    end_s: float
    attributes: dict[str, Any] = field(default_factory=dict)
    resource: dict[str, Any] = field(default_factory=dict)

    @property
    def duration_s(self) -> float:
        return self.end_s - self.start_s

    def number(self, *keys: str) -> float | None:
        """The first of `keys` present as a number."""
        for key in keys:
            v = self.attributes.get(key)
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                return float(v)
        return None

    @property
    def ttft_s(self) -> float | None:
        return self.number("effllm.time_to_first_token_s", "gen_ai.server.time_to_first_token")

    @property
    def output_tokens(self) -> float | None:
        return self.number("gen_ai.usage.output_tokens")

    @property
    def energy_j(self) -> float | None:
        return self.number("effllm.energy_j")

    @property
    def energy_source(self) -> str:
        return str(self.attributes.get("effllm.energy.source", "unknown"))

    @property
    def adapter(self) -> str:
        return str(self.attributes.get("effllm.adapter.name", "") or "")

    @property
    def request_id(self) -> str:
        for key in ("effllm.request_id", "gen_ai.response.id", "gen_ai.request.id"):
            if self.attributes.get(key):
                return str(self.attributes[key])
        return ""


def _trace_id(raw: str) -> str:
    """OTLP/JSON uses hex ids; some writers emit base64 (the protobuf JSON mapping): accept both."""
    if len(raw) == 32:
        return raw.lower()
    import base64

    return base64.b64decode(raw).hex()


def parse_lines(lines: Iterable[str]) -> list[ServerSpan]:
    spans: list[ServerSpan] = []
    for line in lines:
        if not line.strip():
            continue
        doc = json.loads(line)
        for rs in doc.get("resourceSpans", []):
            resource = {a["key"]: _value(a["value"]) for a in rs.get("resource", {}).get("attributes", [])}
            for ss in rs.get("scopeSpans", []):
                for s in ss.get("spans", []):
                    spans.append(
                        ServerSpan(
                            trace_id=_trace_id(s.get("traceId", "")),
                            span_id=s.get("spanId", ""),
                            name=s.get("name", ""),
                            start_s=int(s.get("startTimeUnixNano", 0)) / 1e9,
                            end_s=int(s.get("endTimeUnixNano", 0)) / 1e9,
                            attributes={a["key"]: _value(a["value"]) for a in s.get("attributes", [])},
                            resource=resource,
                        )
                    )
                    kind = s.get("kind")
                    if (
                        kind is not None
                        and kind not in _SPAN_KIND_SERVER
                        and spans[-1].name.startswith("generate")
                    ):
                        spans.pop()  # a client span that happens to share the name
    return spans


def trace_files(paths: Iterable[Path]) -> list[Path]:
    """Expand directories to their *.jsonl / *.json files that look like traces (a rotated `.1` too); a
    file comes with its rotated PATH.1 (telemetry/jsonlines.py), older first."""
    found: list[Path] = []
    for p in paths:
        if p.is_dir():
            found += sorted(x for x in p.rglob("*.json*") if "trace" in x.name or "span" in x.name)
        else:
            found += generations(p)
    return list(dict.fromkeys(found))


def load_spans(paths: Iterable[Path]) -> list[ServerSpan]:
    """All request spans (`generate ...`) from the given files or directories."""
    spans: list[ServerSpan] = []
    for f in trace_files(paths):
        with f.open() as fh:
            spans += parse_lines(fh)
    return [s for s in spans if s.name.startswith("generate")]


def join(rows: list[dict[str, Any]], spans: list[ServerSpan]) -> dict[str, ServerSpan]:
    """rid -> the server span of that request (by trace id, else request id)."""
    by_trace = {s.trace_id: s for s in spans}
    by_rid = {s.request_id: s for s in spans if s.request_id}
    out: dict[str, ServerSpan] = {}
    for r in rows:
        span = by_trace.get(r.get("trace_id", "")) or by_rid.get(r["rid"])
        if span is not None:
            out[r["rid"]] = span
    return out
