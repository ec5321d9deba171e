"""OpenTelemetry set-up for a process: exporters from flags and OTEL_* variables, and adapter spans.

Defaults (no flag, no variable): traces go as OTLP/JSON lines to `runs/<UTC time>-serve/traces.jsonl`
and resource samples to `resource-samples.jsonl` beside it. Flags beat variables beat defaults:
  --otel-exporter  | OTEL_TRACES_EXPORTER (otlp|none)
                   | + OTEL_EXPORTER_OTLP[_TRACES]_PROTOCOL (grpc|http/protobuf)
  --otel-endpoint  | OTEL_EXPORTER_OTLP[_TRACES]_ENDPOINT (read by the OTLP exporters themselves)
  --prometheus-port| OTEL_EXPORTER_PROMETHEUS_PORT (with OTEL_METRICS_EXPORTER=prometheus)
  --prometheus-host| OTEL_EXPORTER_PROMETHEUS_HOST (default 127.0.0.1: never public just because --host is)
  --run-file-max-mb| (none) the byte cap of traces.jsonl and resource-samples.jsonl, rotated to `.1` past it
  --no-telemetry   | OTEL_SDK_DISABLED=true
With an OTLP trace exporter, metrics also go over OTLP (unless OTEL_METRICS_EXPORTER=none).
Invariant: `setup()` installs the global tracer and meter providers once per process;
`Telemetry.shutdown()` flushes every exporter and stops the sampler, so a SIGTERM loses no span.
"""

from __future__ import annotations

import argparse
import logging
import os
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal

from opentelemetry import metrics, trace
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import MetricReader, PeriodicExportingMetricReader
from opentelemetry.sdk.resources import SERVICE_NAME, Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter

from .energy import DEFAULT_WATTS_PER_CORE
from .jsonlines import DEFAULT_MAX_BYTES
from .otlpjson import OtlpJsonFileExporter

log = logging.getLogger(__name__)

Exporter = Literal["none", "file", "otlp-grpc", "otlp-http"]
EXPORTERS: tuple[Exporter, ...] = ("none", "file", "otlp-grpc", "otlp-http")
TRACES_FILE = "traces.jsonl"
SAMPLES_FILE = "resource-samples.jsonl"


def default_run_dir(kind: str = "serve", root: Path | str = "runs") -> Path:
    return Path(root) / f"{datetime.now(timezone.utc).strftime('%Y%m%dT%H%M%SZ')}-{kind}"


@dataclass(frozen=True)
class TelemetryConfig:
    enabled: bool = True
    exporter: Exporter = "file"
    endpoint: str | None = None  # None: the OTLP exporter's own default / OTEL_EXPORTER_OTLP_* variables
    run_dir: Path | None = None  # None: default_run_dir()
    trace_file: Path | None = None  # None: run_dir / traces.jsonl (with exporter "file")
    prometheus_port: int | None = None  # 0: any free port
    prometheus_host: str = "127.0.0.1"  # loopback unless the operator says otherwise (docs/security.md)
    otlp_metrics: bool = True  # with an OTLP trace exporter, export metrics over OTLP too
    metrics_interval_s: float = 10.0
    sample_hz: float = 10.0  # 0: no resource sampler
    # traces.jsonl and resource-samples.jsonl each rotate to `.1` past this (0: no cap)
    run_file_max_bytes: int = DEFAULT_MAX_BYTES
    watts_per_core: float | None = None  # None: EFFLLM_WATTS_PER_CORE or the default
    service_name: str = "effllm-server"
    resource_attributes: Mapping[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.exporter not in EXPORTERS:
            raise ValueError(f"otel exporter {self.exporter!r} is not one of {', '.join(EXPORTERS)}")
        if self.prometheus_port is not None and not 0 <= self.prometheus_port < 65536:
            raise ValueError(f"prometheus port {self.prometheus_port} is not in 0..65535")
        if self.sample_hz < 0 or self.metrics_interval_s <= 0:
            raise ValueError("sample_hz >= 0 and metrics_interval_s > 0 are required")
        if self.run_file_max_bytes < 0:
            raise ValueError(f"run file cap {self.run_file_max_bytes} bytes must be >= 0 (0: no cap)")


def exporter_from_env(env: Mapping[str, str]) -> Exporter | None:
    """The exporter the standard OTEL_* variables ask for, or None when they do not say."""
    raw = env.get("OTEL_TRACES_EXPORTER", "").strip().lower()
    if not raw:
        return None
    if raw == "none":
        return "none"
    if raw == "otlp":
        proto = (
            (
                env.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL")
                or env.get("OTEL_EXPORTER_OTLP_PROTOCOL")
                or "grpc"
            )
            .strip()
            .lower()
        )
        return "otlp-http" if proto.startswith("http") else "otlp-grpc"
    if raw in EXPORTERS:
        return raw  # type: ignore[return-value]
    raise ValueError(f"OTEL_TRACES_EXPORTER={raw!r}: effllm supports otlp, none, file")


def config_from(
    *,
    no_telemetry: bool = False,
    exporter: str | None = None,
    endpoint: str | None = None,
    run_dir: str | Path | None = None,
    trace_file: str | Path | None = None,
    prometheus_port: int | None = None,
    prometheus_host: str | None = None,
    sample_hz: float | None = None,
    watts_per_core: float | None = None,
    service_name: str = "effllm-server",
    env: Mapping[str, str] | None = None,
    run_file_max_bytes: int | None = None,
) -> TelemetryConfig:
    """Flags (None = not given) over OTEL_* variables over defaults."""
    env = os.environ if env is None else env
    disabled = no_telemetry or env.get("OTEL_SDK_DISABLED", "").strip().lower() == "true"
    chosen = exporter or exporter_from_env(env) or "file"
    if prometheus_port is None and env.get("OTEL_METRICS_EXPORTER", "").strip().lower() == "prometheus":
        prometheus_port = int(env.get("OTEL_EXPORTER_PROMETHEUS_PORT", "9464"))
    return TelemetryConfig(
        enabled=not disabled,
        exporter=chosen,  # type: ignore[arg-type]
        endpoint=endpoint,
        run_dir=Path(run_dir) if run_dir else None,
        trace_file=Path(trace_file) if trace_file else None,
        prometheus_port=prometheus_port,
        prometheus_host=prometheus_host
        or env.get("OTEL_EXPORTER_PROMETHEUS_HOST", "").strip()
        or "127.0.0.1",
        otlp_metrics=env.get("OTEL_METRICS_EXPORTER", "").strip().lower() != "none",
        sample_hz=10.0 if sample_hz is None else sample_hz,
        watts_per_core=watts_per_core,
        service_name=service_name,
        run_file_max_bytes=DEFAULT_MAX_BYTES if run_file_max_bytes is None else run_file_max_bytes,
    )


def add_flags(p: argparse.ArgumentParser) -> None:
    """The telemetry flags shared by `effllm serve` (and any command that wants the same knobs)."""
    g = p.add_argument_group("telemetry (flags beat OTEL_* variables)")
    g.add_argument("--no-telemetry", action="store_true", help="no spans, metrics, sampler or energy meter")
    g.add_argument(
        "--otel-exporter",
        choices=EXPORTERS,
        default=None,
        help="where spans go; default: OTEL_TRACES_EXPORTER, else file (OTLP/JSON lines in the run dir)",
    )
    g.add_argument(
        "--otel-endpoint",
        default=None,
        help="OTLP collector, e.g. 127.0.0.1:4317 (grpc) or http://127.0.0.1:4318 (http); "
        "default: OTEL_EXPORTER_OTLP_ENDPOINT",
    )
    g.add_argument("--run-dir", default=None, help="default: runs/<UTC time>-serve")
    g.add_argument("--trace-file", default=None, help="OTLP/JSON lines file (default: RUN_DIR/traces.jsonl)")
    g.add_argument(
        "--prometheus-port",
        type=int,
        default=None,
        help="serve Prometheus text on this port (0: any free port); default: off, "
        "or OTEL_EXPORTER_PROMETHEUS_PORT with OTEL_METRICS_EXPORTER=prometheus",
    )
    g.add_argument(
        "--prometheus-host",
        default=None,
        help="address /metrics listens on; default: OTEL_EXPORTER_PROMETHEUS_HOST, else 127.0.0.1 "
        "(not --host: the endpoint has no auth or TLS, see docs/security.md)",
    )
    g.add_argument("--sample-hz", type=float, default=10.0, help="resource sampler rate (0: off)")
    g.add_argument(
        "--run-file-max-mb",
        type=float,
        default=DEFAULT_MAX_BYTES / (1 << 20),
        help="cap of traces.jsonl and resource-samples.jsonl each; past it a file is rotated to FILE.1 "
        "(the older one dropped), so each kind takes at most twice this (0: no cap)",
    )
    g.add_argument(
        "--watts-per-core",
        type=float,
        default=None,
        help="CPU energy estimate when no meter is readable; default: EFFLLM_WATTS_PER_CORE or "
        f"{DEFAULT_WATTS_PER_CORE}",
    )


def config_from_args(args: argparse.Namespace, service_name: str = "effllm-server") -> TelemetryConfig:
    return config_from(
        no_telemetry=args.no_telemetry,
        exporter=args.otel_exporter,
        endpoint=args.otel_endpoint,
        run_dir=args.run_dir,
        trace_file=args.trace_file,
        prometheus_port=args.prometheus_port,
        # never the gRPC --host: /metrics has no auth (getattr: a namespace built before these flags)
        prometheus_host=getattr(args, "prometheus_host", None),
        sample_hz=args.sample_hz,
        watts_per_core=args.watts_per_core,
        service_name=service_name,
        run_file_max_bytes=(
            int(args.run_file_max_mb * (1 << 20))
            if getattr(args, "run_file_max_mb", None) is not None
            else None
        ),
    )


def _span_exporter(kind: Exporter, endpoint: str | None) -> SpanExporter:
    if kind == "otlp-grpc":
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter as GrpcSpans

        return GrpcSpans(endpoint=endpoint, insecure=True if endpoint and "://" not in endpoint else None)
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter as HttpSpans

    return HttpSpans(endpoint=_http_path(endpoint, "traces"))


def _metric_reader(kind: Exporter, endpoint: str | None, interval_s: float) -> MetricReader:
    exporter: Any
    if kind == "otlp-grpc":
        from opentelemetry.exporter.otlp.proto.grpc.metric_exporter import OTLPMetricExporter as GrpcMetrics

        exporter = GrpcMetrics(
            endpoint=endpoint, insecure=True if endpoint and "://" not in endpoint else None
        )
    else:
        from opentelemetry.exporter.otlp.proto.http.metric_exporter import OTLPMetricExporter as HttpMetrics

        exporter = HttpMetrics(endpoint=_http_path(endpoint, "metrics"))
    return PeriodicExportingMetricReader(exporter, export_interval_millis=interval_s * 1000)


def _http_path(endpoint: str | None, signal: str) -> str | None:
    """--otel-endpoint names the collector's base URL, as OTEL_EXPORTER_OTLP_ENDPOINT does."""
    if endpoint is None:
        return None
    base = endpoint if "://" in endpoint else f"http://{endpoint}"
    return base if base.rstrip("/").endswith(f"/v1/{signal}") else base.rstrip("/") + f"/v1/{signal}"


@dataclass
class Providers:
    tracer_provider: TracerProvider
    meter_provider: MeterProvider
    trace_file: Path | None
    prometheus_port: int | None
    _http: Any = None

    def shutdown(self) -> None:
        for stop in (self.tracer_provider.shutdown, self.meter_provider.shutdown):
            try:
                stop()
            except Exception:
                log.exception("telemetry shutdown")
        if self._http is not None:
            self._http.shutdown()
            self._http = None


def make_providers(config: TelemetryConfig, run_dir: Path) -> Providers:
    """Tracer and meter providers with the exporters `config` asks for (not installed globally)."""
    attrs: dict[str, Any] = dict(config.resource_attributes)
    if not os.environ.get("OTEL_SERVICE_NAME"):
        attrs[SERVICE_NAME] = config.service_name
    resource = Resource.create(attrs)
    tracer_provider = TracerProvider(resource=resource)
    trace_file: Path | None = None
    if config.exporter == "file" or config.trace_file is not None:
        trace_file = config.trace_file or run_dir / TRACES_FILE
        tracer_provider.add_span_processor(
            BatchSpanProcessor(OtlpJsonFileExporter(trace_file, config.run_file_max_bytes))
        )
    if config.exporter in ("otlp-grpc", "otlp-http"):
        tracer_provider.add_span_processor(
            BatchSpanProcessor(_span_exporter(config.exporter, config.endpoint))
        )
    readers: list[MetricReader] = []
    http = None
    port = None
    if config.prometheus_port is not None:
        from opentelemetry.exporter.prometheus import PrometheusMetricReader
        from prometheus_client import start_http_server

        readers.append(PrometheusMetricReader())
        try:
            http, _thread = start_http_server(config.prometheus_port, addr=config.prometheus_host)
        except OSError as err:
            raise OSError(
                f"--prometheus-port {config.prometheus_port} on {config.prometheus_host}: {err}"
            ) from err
        port = int(http.server_port)
    if config.exporter in ("otlp-grpc", "otlp-http") and config.otlp_metrics:
        readers.append(_metric_reader(config.exporter, config.endpoint, config.metrics_interval_s))
    meter_provider = MeterProvider(resource=resource, metric_readers=readers)
    return Providers(tracer_provider, meter_provider, trace_file, port, http)


def install(providers: Providers) -> None:
    """Make them the process's global providers (the OTel API allows this once per process)."""
    trace.set_tracer_provider(providers.tracer_provider)
    metrics.set_meter_provider(providers.meter_provider)


@contextmanager
def adapter_span(
    action: str,
    name: str,
    version: str,
    *,
    tracer_provider: trace.TracerProvider | None = None,
    **attributes: Any,
) -> Iterator[trace.Span]:
    """A span around an adapter operation, for the adapter registry:

        with adapter_span("load", "my-lora", "v3", **{"effllm.adapter.method": "lora"}) as span:
            engine.add_adapter(spec)          # an exception marks the span ERROR and propagates

    `action` is "load", "unload", "evict" or "swap". The span is named `adapter {action} NAME@VERSION`
    and carries effllm.adapter.{action,name,version}; its duration also goes to the
    `effllm.adapter.operation.duration` histogram labelled by action and adapter name.
    Uses the global providers unless `tracer_provider` is given (a no-op when telemetry is off)."""
    tracer = trace.get_tracer("effllm.adapters", tracer_provider=tracer_provider)
    attrs = {
        "effllm.adapter.action": action,
        "effllm.adapter.name": name,
        "effllm.adapter.version": version,
        **attributes,
    }
    outcome = "ok"
    t0 = time.perf_counter()
    with tracer.start_as_current_span(
        f"adapter {action} {name}@{version}", kind=trace.SpanKind.INTERNAL, attributes=attrs
    ) as span:
        try:
            yield span
        except BaseException as err:
            outcome = type(err).__name__
            raise
        finally:
            _adapter_histogram().record(
                time.perf_counter() - t0,
                {"effllm.adapter.action": action, "effllm.adapter": name, "effllm.outcome": outcome},
            )


_adapter_hist: Any = None


def _adapter_histogram() -> Any:
    global _adapter_hist
    if _adapter_hist is None:
        _adapter_hist = metrics.get_meter("effllm.adapters").create_histogram(
            "effllm.adapter.operation.duration", unit="s", description="Adapter load/unload/evict time"
        )
    return _adapter_hist
