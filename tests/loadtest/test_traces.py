"""OTLP/JSON trace lines are parsed and joined to client rows by trace id, else by request id."""

from __future__ import annotations

import json
from pathlib import Path

from effllm.loadtest.traces import join, load_spans


def _line(trace_id: str, name: str, kind: int, attrs: dict[str, object]) -> str:
    def val(v: object) -> dict[str, object]:
        if isinstance(v, bool):
            return {"boolValue": v}
        if isinstance(v, int):
            return {"intValue": str(v)}
        if isinstance(v, float):
            return {"doubleValue": v}
        return {"stringValue": str(v)}

    span = {
        "traceId": trace_id,
        "spanId": "00f067aa0ba902b7",
        "name": name,
        "kind": kind,
        "startTimeUnixNano": "1700000000000000000",
        "endTimeUnixNano": "1700000001500000000",
        "attributes": [{"key": k, "value": val(v)} for k, v in attrs.items()],
    }
    return json.dumps(
        {
            "resourceSpans": [
                {
                    "resource": {
                        "attributes": [{"key": "service.name", "value": {"stringValue": "effllm-server"}}]
                    },
                    "scopeSpans": [{"scope": {"name": "effllm"}, "spans": [span]}],
                }
            ]
        }
    )


def test_parse_and_join(tmp_path: Path) -> None:
    t1, t2 = "4bf92f3577b34da6a3ce929d0e0e4736", "5bf92f3577b34da6a3ce929d0e0e4736"
    lines = [
        _line(
            t1,
            "generate SmolLM2",
            2,
            {
                "effllm.adapter.name": "a1",
                "effllm.time_to_first_token_s": 0.12,
                "gen_ai.usage.output_tokens": 16,
                "effllm.energy_j": 3.5,
                "effllm.energy.source": "estimated",
            },
        ),
        _line(t2, "generate SmolLM2", 2, {"effllm.request_id": "r2", "gen_ai.usage.output_tokens": 4}),
        _line(t1, "generate base", 3, {}),  # a CLIENT span with the same name: not a server request
        _line(t1, "health", 2, {}),
    ]
    (tmp_path / "traces-1.jsonl").write_text("\n".join(lines) + "\n")
    spans = load_spans([tmp_path])
    assert len(spans) == 2
    s = spans[0]
    assert (s.adapter, s.ttft_s, s.output_tokens, s.energy_j, s.energy_source) == (
        "a1",
        0.12,
        16.0,
        3.5,
        "estimated",
    )
    assert abs(s.duration_s - 1.5) < 1e-9 and s.resource["service.name"] == "effllm-server"
    rows = [
        {"rid": "r1", "trace_id": t1},
        {"rid": "r2", "trace_id": "0" * 32},
        {"rid": "r3", "trace_id": "1" * 32},
    ]
    joined = join(rows, spans)
    assert set(joined) == {"r1", "r2"} and joined["r2"].trace_id == t2
