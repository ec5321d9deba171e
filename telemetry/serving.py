"""Everything the server needs from telemetry, started and stopped as one: providers, the gRPC server
interceptor, the request observer, the resource sampler and the gauges.

    tel = ServerTelemetry.start(config, ServedModel(model, precision, engine), load=lambda: (queued, running))
    grpc.aio.server(interceptors=tel.interceptors()); runner = Runner(..., observer=tel.observer)
    ...
    tel.shutdown()   # flushes spans and metrics, writes the last sample

Invariant: one ServerTelemetry per process (it installs the global providers); `shutdown()` is
idempotent. The run directory gets traces.jsonl (with the file exporter), resource-samples.jsonl and
telemetry.json (what was configured and which energy source was used).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from opentelemetry import metrics, trace
from opentelemetry.instrumentation.grpc import aio_server_interceptor
from opentelemetry.instrumentation.grpc.filters import any_of, health_check, negate, service_prefix

from .attribution import EnergyAttributor
from .energy import select_meter
from .genai import (
    Instruments,
    RequestObserver,
    ServedModel,
    register_gauges,
    register_variant_gauge,
    resident_adapters,
)
from .sampler import ResourceSampler, Sample, WindowSummary
from .tracing import SAMPLES_FILE, Providers, TelemetryConfig, default_run_dir, install, make_providers

log = logging.getLogger(__name__)

LoadFn = Callable[[], tuple[int, int]]  # () -> (queued, running)


@dataclass
class ServerTelemetry:
    config: TelemetryConfig
    run_dir: Path
    providers: Providers
    observer: RequestObserver
    sampler: ResourceSampler | None
    _stopped: bool = False

    @classmethod
    def start(cls, config: TelemetryConfig, served: ServedModel, load: LoadFn) -> ServerTelemetry:
        run_dir = config.run_dir or default_run_dir("serve")
        run_dir.mkdir(parents=True, exist_ok=True)
        providers = make_providers(config, run_dir)
        install(providers)
        sampler = None
        if config.sample_hz > 0:
            sampler = ResourceSampler(
                config.sample_hz,
                path=run_dir / SAMPLES_FILE,
                watts_per_core=config.watts_per_core,
                max_file_bytes=config.run_file_max_bytes,
            ).start()
            meter = sampler.meter
        else:
            meter = select_meter(watts_per_core=config.watts_per_core)
        otel_meter = metrics.get_meter("effllm.server")
        observer = RequestObserver(
            served, trace.get_tracer("effllm.server"), Instruments(otel_meter), EnergyAttributor(meter)
        )
        _gauges(otel_meter, served, load, sampler)
        tel = cls(config, run_dir, providers, observer, sampler)
        tel._write_manifest(served, meter.source)
        log.info(
            "telemetry: exporter %s%s; traces -> %s; resource samples -> %s; energy source %s%s",
            config.exporter,
            f" ({config.endpoint})" if config.endpoint else "",
            providers.trace_file or "(not written to a file)",
            run_dir / SAMPLES_FILE if sampler else "(off)",
            meter.source,
            f"; prometheus on http://{config.prometheus_host}:{providers.prometheus_port}/metrics"
            if providers.prometheus_port is not None
            else "",
        )
        return tel

    def resources(self, start_s: float | None, end_s: float | None) -> WindowSummary | None:
        """AMU, PCU, AEC and energy over [start_s, end_s] in O(log n) samples (None: no sampler, no
        sample in the window, or mixed energy sources): what GetTelemetry returns with the observer's
        `recent()` requests, and telemetry/report.py's `window` for their groups."""
        return self.sampler.window_summary(start_s, end_s) if self.sampler is not None else None

    def resources_and_samples(
        self, start_s: float | None, end_s: float | None
    ) -> tuple[WindowSummary | None, list[Sample]]:
        """`resources()` and the samples it summarises, read together."""
        return self.sampler.window(start_s, end_s) if self.sampler is not None else (None, [])

    def sample_count(self, start_s: float | None, end_s: float | None) -> int:
        return self.sampler.count_between(start_s, end_s) if self.sampler is not None else 0

    def watch_variants(self, states: Callable[[], dict[str, bool]]) -> None:
        """The `effllm.variant.alive` gauge over the server's variants (name -> alive)."""
        register_variant_gauge(metrics.get_meter("effllm.server"), states)

    def interceptors(self) -> list[Any]:
        """The OpenTelemetry aio server interceptor: SERVER spans parented by the W3C context in metadata."""
        # Health probes and reflection would bury the generation spans (orchestrators poll every second).
        skip = any_of(health_check(), service_prefix("grpc.reflection."))
        return [aio_server_interceptor(tracer_provider=self.providers.tracer_provider, filter_=negate(skip))]

    def _write_manifest(self, served: ServedModel, source: str) -> None:
        info = {
            "model": served.model,
            "precision": served.precision,
            "engine": served.engine,
            "exporter": self.config.exporter,
            "endpoint": self.config.endpoint,
            "trace_file": str(self.providers.trace_file) if self.providers.trace_file else None,
            "samples_file": SAMPLES_FILE if self.sampler else None,
            "sample_hz": self.config.sample_hz,
            "energy_source": source,
            "watts_per_core": getattr(
                self.observer.attributor.meter if self.observer.attributor else None, "watts_per_core", None
            ),
            "prometheus_port": self.providers.prometheus_port,
        }
        (self.run_dir / "telemetry.json").write_text(json.dumps(info, indent=2) + "\n")

    def shutdown(self) -> None:
        if self._stopped:
            return
        self._stopped = True
        if self.sampler is not None:
            self.sampler.stop()
        elif self.observer.attributor is not None:
            self.observer.attributor.meter.close()
        self.providers.shutdown()
        log.info("telemetry flushed to %s", self.run_dir)


def _gauges(meter: metrics.Meter, served: ServedModel, load: LoadFn, sampler: ResourceSampler | None) -> None:
    labels = {"gen_ai.request.model": served.model, "effllm.precision": served.precision}

    def latest(field: str) -> Callable[[], Any]:
        def read() -> Any:
            s = sampler.latest if sampler is not None else None
            return getattr(s, field) if s is not None else None

        return read

    def device_memory() -> Any:
        s = sampler.latest if sampler is not None else None
        if s is None:
            return None
        return s.gpu_memory_used_bytes if s.gpu_memory_total_bytes else s.rss_bytes

    register_gauges(
        meter,
        {
            "effllm.server.queue.depth": (
                lambda: load()[0],
                "{request}",
                "Requests waiting for a batch slot",
            ),
            "effllm.server.batch.size": (lambda: load()[1], "{request}", "Requests holding a batch slot"),
            "effllm.adapters.resident": (resident_adapters, "{adapter}", "Adapters resident in the engine"),
            "process.memory.usage": (latest("rss_bytes"), "By", "RSS of the server process and its children"),
            "effllm.device.memory.usage": (device_memory, "By", "GPU memory in use (process RSS on CPU)"),
        },
        labels,
    )
    if sampler is not None:
        register_gauges(
            meter,
            {
                "effllm.power": (latest("power_w"), "W", "Power draw (see effllm.energy.source)"),
                # The inputs of AMU, PCU and AEC (their time averages over a window: avg_over_time).
                "effllm.memory.utilisation": (
                    latest("memory_utilisation"),
                    "1",
                    "GPU memory used/total, or the process tree's RSS / RAM on CPU (AMU's input)",
                ),
                "effllm.utilisation": (
                    latest("utilisation"),
                    "1",
                    "GPU utilisation, or the process tree's CPU share of all cores (PCU's input)",
                ),
                "effllm.energy.meter": (
                    latest("energy_j"),
                    "J",
                    "Energy since the sampler started (see effllm.energy.source)",
                ),
            },
            {**labels, "effllm.energy.source": sampler.meter.source},
        )
