"""Telemetry through the real server: OTLP spans parented by the client's span, Prometheus histograms
with the adapter label, and the default run's trace file turned into a report by `effllm report`."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path

import grpc
import pytest
from google.protobuf import json_format
from opentelemetry.proto.collector.metrics.v1 import metrics_service_pb2, metrics_service_pb2_grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind
from prometheus_client.parser import text_string_to_metric_families

from effllm.telemetry.otlpjson import SPAN_KIND_SERVER, STATUS_ERROR, SpanRecord, spans_from_request

from ..serverproc import ServerProcess, start_server

MODEL = "SmolLM2-135M-Instruct"
SPAN_NAME = f"generate {MODEL}"


class Receiver(trace_service_pb2_grpc.TraceServiceServicer, metrics_service_pb2_grpc.MetricsServiceServicer):
    """An OTLP/gRPC collector on loopback that keeps what it is sent."""

    def __init__(self) -> None:
        self.spans: list[SpanRecord] = []
        self.metric_names: dict[str, list[dict[str, object]]] = {}
        self.lock = threading.Lock()

    def Export(self, request, context):  # type: ignore[no-untyped-def]
        if isinstance(request, trace_service_pb2.ExportTraceServiceRequest):
            as_json = json_format.MessageToDict(request, use_integers_for_enums=True)
            for rs in as_json.get("resourceSpans", []):  # protobuf JSON has base64 ids: make them hex
                for ss in rs.get("scopeSpans", []):
                    for sp in ss.get("spans", []):
                        for key in ("traceId", "spanId", "parentSpanId"):
                            if key in sp:
                                sp[key] = _b64_hex(sp[key])
            with self.lock:
                self.spans.extend(spans_from_request(as_json))
            return trace_service_pb2.ExportTraceServiceResponse()
        with self.lock:
            for rm in request.resource_metrics:
                for sm in rm.scope_metrics:
                    for m in sm.metrics:
                        points = m.histogram.data_points or m.sum.data_points or m.gauge.data_points
                        self.metric_names.setdefault(m.name, []).extend(
                            {a.key: a.value.string_value for a in p.attributes} for p in points
                        )
        return metrics_service_pb2.ExportMetricsServiceResponse()


def _b64_hex(value: str) -> str:
    import base64

    return base64.b64decode(value).hex()


@pytest.fixture(scope="module")
def receiver() -> Iterator[tuple[Receiver, int]]:
    recv = Receiver()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(recv, server)
    metrics_service_pb2_grpc.add_MetricsServiceServicer_to_server(recv, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield recv, port
    server.stop(0)


def _prometheus_url(server: ServerProcess) -> str:
    m = re.search(r"prometheus on (http://\S+/metrics)", server.log())
    assert m, server.log()[-3000:]
    return m.group(1)


def _histogram_counts(text: str, name: str) -> dict[tuple[tuple[str, str], ...], float]:
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == f"{name}_count":
                out[tuple(sorted(s.labels.items()))] = s.value
    return out


def test_stream_makes_one_server_span_parented_by_the_client_and_labelled_metrics(
    receiver: tuple[Receiver, int], tmp_path: Path, logs_dir: Path
) -> None:
    recv, otlp_port = receiver
    server = start_server(
        "--engine",
        "vllm",
        "--precision",
        "fp32",
        "--max-concurrency",
        "4",
        "--max-context",
        "512",
        "--kv-cache-gib",
        "0.25",
        "--otel-exporter",
        "otlp-grpc",
        "--otel-endpoint",
        f"127.0.0.1:{otlp_port}",
        "--prometheus-port",
        "0",
        "--run-dir",
        str(tmp_path / "run"),
        log_dir=logs_dir,
    )
    client_spans = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(client_spans))
    try:
        with server.client(tracer_provider=provider) as client:
            chunks = list(
                client.stream(
                    "The capital of France is",
                    max_new_tokens=6,
                    temperature=0.7,
                    top_p=0.9,
                    request_id="tel-e2e-1",
                )
            )
            final = chunks[-1].final
            with pytest.raises(grpc.RpcError) as err:
                list(client.stream("hi", adapter="nope", max_new_tokens=2, request_id="tel-e2e-bad"))
            # NOT_FOUND once adapters are served, FAILED_PRECONDITION where the engine has none
            bad_code = err.value.code().name
            assert bad_code in ("NOT_FOUND", "FAILED_PRECONDITION")
        prom = urllib.request.urlopen(_prometheus_url(server), timeout=10).read().decode()
    finally:
        assert server.stop() == 0  # SIGTERM: drain, then flush spans and metrics

    # -- metrics (Prometheus text, scraped while the server ran)
    labels = (("effllm_adapter", "(base)"), ("effllm_precision", "fp32"), ("gen_ai_request_model", MODEL))
    for metric in (
        "gen_ai_server_time_to_first_token_seconds",
        "gen_ai_server_time_per_output_token_seconds",
        "gen_ai_server_request_duration_seconds",
    ):
        counts = _histogram_counts(prom, metric)
        # the exporter gives every series of a family the same label names: "" where a point lacks one
        ok = [v for k, v in counts.items() if set(labels) <= set(k) and not dict(k).get("error_type")]
        assert ok == [1.0], (metric, counts)
    usage = _histogram_counts(prom, "gen_ai_client_token_usage")
    types = {dict(k)["gen_ai_token_type"] for k, v in usage.items() if set(labels) <= set(k) and v == 1.0}
    assert types == {"input", "output"}
    failed = _histogram_counts(prom, "gen_ai_server_request_duration_seconds")
    assert any(
        dict(k).get("error_type") == bad_code and dict(k)["effllm_adapter"] == "(invalid)" for k in failed
    )
    assert "effllm_server_queue_depth" in prom and "effllm_power_watts" in prom

    # -- spans (OTLP/gRPC to the in-process receiver)
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline and len([s for s in recv.spans if s.name == SPAN_NAME]) < 2:
        time.sleep(0.2)
    generation = [s for s in recv.spans if s.name == SPAN_NAME]
    mine = [s for s in generation if s.attributes.get("gen_ai.response.id") == "tel-e2e-1"]
    assert len(mine) == 1, [s.name for s in recv.spans]
    span = mine[0]
    (client_span,) = [
        s
        for s in client_spans.get_finished_spans()
        if s.kind == SpanKind.CLIENT and s.context.trace_id == int(span.trace_id, 16)
    ]
    assert span.kind == SPAN_KIND_SERVER
    assert span.parent_span_id == f"{client_span.context.span_id:016x}"
    assert len([s for s in recv.spans if s.trace_id == span.trace_id and s.kind == SPAN_KIND_SERVER]) == 1
    a = span.attributes
    assert a["gen_ai.operation.name"] == "text_completion" and a["gen_ai.provider.name"] == "effllm"
    assert a["gen_ai.request.model"] == MODEL and a["gen_ai.request.max_tokens"] == 6
    assert a["gen_ai.request.temperature"] == pytest.approx(0.7) and a[
        "gen_ai.request.top_p"
    ] == pytest.approx(0.9)
    assert a["gen_ai.usage.input_tokens"] == final.usage.input_tokens > 0
    assert a["gen_ai.usage.output_tokens"] == final.usage.output_tokens == 6
    assert a["gen_ai.response.finish_reasons"] == ["length"]
    assert a["effllm.adapter.name"] == "(base)" and a["effllm.adapter.version"] == ""
    assert a["effllm.precision"] == "fp32" and a["effllm.engine"] == "vllm"
    assert a["effllm.queue_s"] == pytest.approx(final.timings.queue_s)
    assert a["effllm.time_to_first_token_s"] == pytest.approx(final.timings.time_to_first_token_s)
    assert a["effllm.decode_s"] == pytest.approx(final.timings.decode_s) and a["effllm.decode_s"] > 0
    assert a["effllm.energy.source"] == "estimated" and a["effllm.energy_j"] > 0
    assert a["rpc.grpc.status_code"] == 0
    bad = [s for s in generation if s.attributes.get("gen_ai.response.id") == "tel-e2e-bad"]
    assert len(bad) == 1 and bad[0].status_code == STATUS_ERROR
    assert bad[0].attributes["error.type"] == bad_code
    assert bad[0].attributes["effllm.adapter.name"] == "nope"
    # -- metrics also went over OTLP to the same collector, with the adapter label
    assert any(
        p.get("effllm.adapter") == "(base)" for p in recv.metric_names["gen_ai.server.time_to_first_token"]
    )


def test_default_run_leaves_traces_that_effllm_report_tabulates(
    vllm_server: ServerProcess, tmp_path: Path
) -> None:
    m = re.search(r"traces -> (\S+);", vllm_server.log())
    assert m, "the server log names its trace file"
    trace_file = Path(m.group(1))
    assert trace_file.name == "traces.jsonl" and trace_file.parent.name.endswith("-serve")
    ids = [f"tel-report-{i}-{time.time_ns()}" for i in range(2)]
    with vllm_server.client() as client:
        for rid in ids:
            list(client.stream("Once upon a time", max_new_tokens=4, request_id=rid))
    deadline = time.monotonic() + 20  # the batch span processor exports every 5 s (0.2 s in tests)
    while time.monotonic() < deadline and not all(rid in trace_file.read_text() for rid in ids):
        time.sleep(0.5)
    assert all(rid in trace_file.read_text() for rid in ids)
    assert (trace_file.parent / "resource-samples.jsonl").stat().st_size > 0
    out = tmp_path / "report.json"
    proc = subprocess.run(
        [sys.executable, "-m", "effllm.cli.main", "report", str(trace_file), "--json", str(out)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert MODEL in proc.stdout and "ALL" in proc.stdout and "estimated" in proc.stdout
    report = json.loads(out.read_text())
    total = report["groups"][-1]
    assert total["adapter"] == "ALL" and total["requests"] >= 2 and total["output_tokens"] >= 8
    assert total["energy_source"] == "estimated" and total["j_per_token"] > 0
    assert 0 < total["amu"] < 1 and total["pcu"] is not None and total["aec_w"] > 0
    assert total["ttft_s"]["p50"] > 0 and total["wall_tokens_per_s"] > 0
