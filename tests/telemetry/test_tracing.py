"""Configuration precedence (flags > OTEL_* > defaults), exporter wiring, and adapter spans."""

from __future__ import annotations

import urllib.request
from dataclasses import replace
from pathlib import Path

import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import StatusCode

from effllm.telemetry.otlpjson import read_spans
from effllm.telemetry.tracing import (
    TelemetryConfig,
    adapter_span,
    config_from,
    config_from_args,
    exporter_from_env,
    make_providers,
)


def test_defaults_write_a_file() -> None:
    c = config_from(env={})
    assert c.enabled and c.exporter == "file" and c.prometheus_port is None and c.sample_hz == 10.0


def test_env_selects_and_flags_win() -> None:
    env = {
        "OTEL_TRACES_EXPORTER": "otlp",
        "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf",
        "OTEL_METRICS_EXPORTER": "prometheus",
        "OTEL_EXPORTER_PROMETHEUS_PORT": "9999",
    }
    c = config_from(env=env)
    assert c.exporter == "otlp-http" and c.prometheus_port == 9999
    c = config_from(env=env, exporter="none", prometheus_port=1234)
    assert c.exporter == "none" and c.prometheus_port == 1234
    assert exporter_from_env({"OTEL_TRACES_EXPORTER": "otlp"}) == "otlp-grpc"
    assert (
        exporter_from_env(
            {
                "OTEL_TRACES_EXPORTER": "otlp",
                "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL": "grpc",
                "OTEL_EXPORTER_OTLP_PROTOCOL": "http/json",
            }
        )
        == "otlp-grpc"
    )
    assert exporter_from_env({}) is None


def test_disabled_by_flag_or_sdk_variable() -> None:
    assert not config_from(no_telemetry=True, env={}).enabled
    assert not config_from(env={"OTEL_SDK_DISABLED": "true"}).enabled


def test_bad_values_are_refused_with_the_reason() -> None:
    with pytest.raises(ValueError, match="OTEL_TRACES_EXPORTER"):
        config_from(env={"OTEL_TRACES_EXPORTER": "zipkin"})
    with pytest.raises(ValueError, match="otel exporter"):
        TelemetryConfig(exporter="kafka")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="prometheus port"):
        TelemetryConfig(prometheus_port=70000)


def test_providers_write_the_trace_file_and_serve_prometheus(tmp_path: Path) -> None:
    providers = make_providers(TelemetryConfig(prometheus_port=0, sample_hz=0), tmp_path)
    try:
        assert providers.trace_file == tmp_path / "traces.jsonl"
        with providers.tracer_provider.get_tracer("t").start_as_current_span("hello"):
            pass
        providers.meter_provider.get_meter("t").create_counter("effllm.test.things").add(3, {"k": "v"})
        text = urllib.request.urlopen(f"http://127.0.0.1:{providers.prometheus_port}/metrics").read().decode()
        assert 'effllm_test_things_total{k="v"' in text
    finally:
        providers.shutdown()  # flushes the batch processor
    assert [s.name for s in read_spans(tmp_path / "traces.jsonl")] == ["hello"]


def test_adapter_span_ok_and_error() -> None:
    spans = InMemorySpanExporter()
    tp = TracerProvider()
    tp.add_span_processor(SimpleSpanProcessor(spans))
    with adapter_span("load", "sql", "v1", tracer_provider=tp, **{"effllm.adapter.method": "lora"}):
        pass
    with pytest.raises(RuntimeError), adapter_span("evict", "sql", "v1", tracer_provider=tp):
        raise RuntimeError("engine refused")
    load, evict = spans.get_finished_spans()
    assert load.name == "adapter load sql@v1"
    assert dict(load.attributes or {}) == {
        "effllm.adapter.action": "load",
        "effllm.adapter.name": "sql",
        "effllm.adapter.version": "v1",
        "effllm.adapter.method": "lora",
    }
    assert evict.status.status_code == StatusCode.ERROR and "engine refused" in (
        evict.status.description or ""
    )


def test_otlp_http_exporter_posts_protobuf_to_the_collector_paths(tmp_path: Path) -> None:
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

    got: dict[str, bytes] = {}

    class Collector(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            got[self.path] = self.rfile.read(int(self.headers["Content-Length"]))
            self.send_response(200)
            self.send_header("Content-Type", "application/x-protobuf")
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Collector)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        endpoint = f"http://127.0.0.1:{httpd.server_address[1]}"
        providers = make_providers(
            TelemetryConfig(exporter="otlp-http", endpoint=endpoint, sample_hz=0), tmp_path
        )
        assert providers.trace_file is None  # OTLP only: no file unless --trace-file says so
        with providers.tracer_provider.get_tracer("t").start_as_current_span("over-http"):
            pass
        providers.meter_provider.get_meter("t").create_counter("effllm.test.http").add(1)
        providers.shutdown()
    finally:
        httpd.shutdown()
    assert set(got) == {"/v1/traces", "/v1/metrics"}
    request = ExportTraceServiceRequest.FromString(got["/v1/traces"])
    assert request.resource_spans[0].scope_spans[0].spans[0].name == "over-http"


def test_busy_prometheus_port_is_a_clear_error(tmp_path: Path) -> None:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        with pytest.raises(OSError, match=f"--prometheus-port {port}"):
            make_providers(TelemetryConfig(exporter="none", prometheus_port=port, sample_hz=0), tmp_path)


def test_prometheus_binds_loopback_whatever_the_grpc_host(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`--host 0.0.0.0` opens gRPC to the network; /metrics (no auth, no TLS) stays on loopback unless
    OTEL_EXPORTER_PROMETHEUS_HOST or --prometheus-host says otherwise (on main it followed --host)."""
    from effllm.cli.main import build_parser

    monkeypatch.delenv("OTEL_EXPORTER_PROMETHEUS_HOST", raising=False)
    parse = build_parser().parse_args
    public = parse(["serve", "--host", "0.0.0.0", "--prometheus-port", "0"])
    config = config_from_args(public)
    assert config.prometheus_host == "127.0.0.1"
    providers = make_providers(replace(config, sample_hz=0, exporter="none"), tmp_path)
    try:
        assert providers._http.server_address[0] == "127.0.0.1"
    finally:
        providers.shutdown()
    monkeypatch.setenv("OTEL_EXPORTER_PROMETHEUS_HOST", "0.0.0.0")
    assert config_from_args(public).prometheus_host == "0.0.0.0"
    flag = parse(["serve", "--host", "0.0.0.0", "--prometheus-host", "10.1.2.3"])
    assert config_from_args(flag).prometheus_host == "10.1.2.3"  # the flag beats the variable
    assert config_from_args(parse(["serve", "--run-file-max-mb", "2"])).run_file_max_bytes == 2 << 20
