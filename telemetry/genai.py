"""GenAI semantic conventions for the server: the per-request span, the histograms and the gauges.

The runner calls `RequestObserver.begin()` when a request arrives and then, on the returned trace,
`scheduled()` once it holds a batch slot, and exactly one of `finish()`, `fail()` or `cancelled()`.
The span is the gRPC SERVER span the OpenTelemetry interceptor made (so the client's W3C context
parents it); we rename it `generate {model}` and give it the gen_ai.* and effllm.* attributes. Without
an interceptor (or a recording span) the observer starts its own SERVER span.
Invariant: plain values in, no server types imported (telemetry sits below the server). Metric
attributes are low-cardinality: model, adapter NAME (not version), precision, operation, error type;
a request that failed for a reason that may stem from a bad adapter name (not_found,
invalid_argument, failed_precondition) is labelled `(invalid)` so clients cannot mint label values; the
figures kept for GetTelemetry say `(invalid)` too, so minted names never become its groups (the span still
names the adapter it asked for). The kept figures are bounded (`keep_last` records of
the attributes GetTelemetry and telemetry/report.py read, `KEPT`).
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from opentelemetry import metrics, trace
from opentelemetry.trace import SpanKind, Status, StatusCode

from .attribution import Attributed, EnergyAttributor
from .otlpjson import SPAN_KIND_SERVER, STATUS_ERROR, SpanRecord

PROVIDER = "effllm"
BASE_ADAPTER = "(base)"  # the adapter label of base-model requests; not a valid adapter name
INVALID_ADAPTER = "(invalid)"  # the label of requests that failed for a possibly bad adapter name
_NAME_ERRORS = frozenset({"not_found", "invalid_argument", "failed_precondition"})
SPAN_PREFIX = "generate "
# The span attributes kept per finished request for GetTelemetry (the rest go only to the exporters).
KEPT = frozenset(
    {
        "gen_ai.request.model",
        "gen_ai.response.id",
        "gen_ai.usage.input_tokens",
        "gen_ai.usage.output_tokens",
        "effllm.adapter.name",
        "effllm.adapter.version",
        "effllm.model.parameters",
        "effllm.queue_s",
        "effllm.time_to_first_token_s",
        "effllm.decode_s",
        "effllm.energy_j",
        "effllm.energy.source",
        "effllm.route.variant",
        "effllm.route.objective",
        "effllm.model",
        "error.type",
    }
)

# Explicit bucket boundaries the GenAI semantic conventions advise for each histogram.
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0)
TPOT_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5)
DURATION_BUCKETS = (0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56, 5.12, 10.24, 20.48, 40.96, 81.92)
TOKEN_BUCKETS = (1, 4, 16, 64, 256, 1024, 4096, 16384, 65536, 262144, 1048576, 4194304, 16777216, 67108864)


@dataclass(frozen=True)
class ServedModel:
    """What this server serves: constant labels of every span and metric."""

    model: str
    precision: str
    engine: str
    parameters: int = 0  # lets reports compute the per-parameter throughput


@dataclass(frozen=True)
class RequestStart:
    request_id: str
    chat: bool  # messages (chat) or a raw prompt (text_completion)
    max_tokens: int
    temperature: float
    top_p: float
    adapter: str  # as the client named it: "", NAME or NAME@VERSION
    # The variant the request runs on (a server with several: PRECISION:ENGINE); "" = the served model.
    variant: str = ""
    precision: str = ""
    engine: str = ""
    # The base model it runs on (a server hosting several: its name there); "" = the served model.
    model: str = ""


@dataclass(frozen=True)
class RouteNote:
    """Why a request runs on its variant: the router's decision, for the span and the metrics."""

    objective: str  # latency | energy | quality | balanced
    variant: str
    reason: str
    candidates: str = ""  # the candidates' predicted figures, one JSON object
    budget_met: bool | None = None  # None: the request had no budget


@dataclass(frozen=True)
class RequestEnd:
    input_tokens: int
    output_tokens: int
    finish_reason: str
    adapter: str  # NAME@VERSION actually used; "" for the base model
    queue_s: float
    time_to_first_token_s: float
    decode_s: float
    total_s: float


def split_adapter(adapter: str) -> tuple[str, str]:
    """ "NAME@VERSION" -> (NAME, VERSION); "NAME" -> (NAME, ""); "" -> ("(base)", "")."""
    if not adapter:
        return BASE_ADAPTER, ""
    name, _, version = adapter.partition("@")
    return name, version


class Instruments:
    """The histograms and gauges, made once per meter."""

    def __init__(self, meter: metrics.Meter) -> None:
        self.ttft = meter.create_histogram(
            "gen_ai.server.time_to_first_token",
            unit="s",
            description="Time to generate the first token",
            explicit_bucket_boundaries_advisory=TTFT_BUCKETS,
        )
        self.tpot = meter.create_histogram(
            "gen_ai.server.time_per_output_token",
            unit="s",
            description="Time per output token after the first (decode phase)",
            explicit_bucket_boundaries_advisory=TPOT_BUCKETS,
        )
        self.duration = meter.create_histogram(
            "gen_ai.server.request.duration",
            unit="s",
            description="Generation request duration on the server",
            explicit_bucket_boundaries_advisory=DURATION_BUCKETS,
        )
        self.tokens = meter.create_histogram(
            "gen_ai.client.token.usage",
            unit="{token}",
            description="Input and output tokens per request",
            explicit_bucket_boundaries_advisory=TOKEN_BUCKETS,
        )
        self.energy = meter.create_counter(
            "effllm.energy", unit="J", description="Energy attributed to requests (see effllm.energy.source)"
        )
        self.routes = meter.create_counter(
            "effllm.route.decisions",
            unit="{request}",
            description="Requests routed to each variant, by objective and whether the budget was met",
        )


Gauge = Callable[[], float]


def register_gauges(
    meter: metrics.Meter, values: dict[str, tuple[Gauge, str, str]], attributes: dict[str, str] | None = None
) -> None:
    """One observable gauge per entry: name -> (callback, unit, description). A callback that raises
    or returns None is skipped for that collection rather than breaking the scrape."""
    attrs = attributes or {}
    for name, (fn, unit, description) in values.items():

        def observe(_options: metrics.CallbackOptions, fn: Gauge = fn) -> Iterable[metrics.Observation]:
            try:
                value = fn()
            except Exception:
                return []
            return [] if value is None else [metrics.Observation(value, attrs)]

        meter.create_observable_gauge(name, callbacks=[observe], unit=unit, description=description)


def register_variant_gauge(meter: metrics.Meter, states: Callable[[], dict[str, bool]]) -> None:
    """`effllm.variant.alive`: 1 for each variant whose engine lives, 0 for a dead one, labelled
    `effllm.variant` (`states`: variant name -> alive)."""

    def observe(_options: metrics.CallbackOptions) -> Iterable[metrics.Observation]:
        try:
            now = states()
        except Exception:
            return []
        return [metrics.Observation(int(alive), {"effllm.variant": name}) for name, alive in now.items()]

    meter.create_observable_gauge(
        "effllm.variant.alive",
        callbacks=[observe],
        unit="1",
        description="1 while the variant's engine lives, 0 once it died (the others serve on)",
    )


_resident_source: Callable[[], Sequence[str]] | None = None


def set_resident_adapters_source(source: Callable[[], Sequence[str]] | None) -> None:
    """The adapter registry calls this once with a function returning the resident NAME@VERSION keys;
    the `effllm.adapters.resident` gauge reports how many there are."""
    global _resident_source
    _resident_source = source


def resident_adapters() -> float:
    return float(len(_resident_source())) if _resident_source is not None else 0.0


class RequestTrace:
    """One request's span, metrics and energy share. Not thread-safe: one request, one task."""

    def __init__(self, observer: RequestObserver, start: RequestStart) -> None:
        self.o = observer
        self.start = start
        self.started = time.perf_counter()
        self.started_ns = time.time_ns()
        self.attributes: dict[str, Any] = {}  # what the span got: kept for GetTelemetry (see recent())
        self._error = False
        name, version = split_adapter(start.adapter)
        s = observer.served
        precision, engine = start.precision or s.precision, start.engine or s.engine
        self.model = start.model or s.model
        self.variant = start.variant or f"{precision}:{engine}"
        # its engine is the energy group: variant names repeat across models, so another model's are qualified
        self.group = self.variant if self.model == s.model else f"{self.model}/{self.variant}"
        self.labels = {
            **observer.labels,
            "gen_ai.request.model": self.model,
            "effllm.model": self.model,
            "effllm.precision": precision,
            "effllm.variant": self.variant,
            "gen_ai.operation.name": _operation(start.chat),
            "effllm.adapter": name,
        }
        self.energy: Attributed | None = None  # the attributed share, once the request has finished
        span = trace.get_current_span()
        self._own = not (span.is_recording() and getattr(span, "kind", None) == SpanKind.SERVER)
        if self._own:
            span = observer.tracer.start_span(SPAN_PREFIX + self.model, kind=SpanKind.SERVER)
        else:
            span.update_name(SPAN_PREFIX + self.model)
        self.span = span
        self._running = False
        self._done = False
        # The figures are kept (GetTelemetry) even when the span does not record.
        self._set(
            {
                "gen_ai.operation.name": _operation(start.chat),
                "gen_ai.provider.name": PROVIDER,
                "gen_ai.request.model": self.model,
                "effllm.model": self.model,
                "gen_ai.request.max_tokens": start.max_tokens,
                "gen_ai.request.temperature": start.temperature,
                "gen_ai.request.top_p": start.top_p,
                "gen_ai.response.id": start.request_id,
                "effllm.adapter.name": name,
                "effllm.adapter.version": version,
                "effllm.precision": precision,
                "effllm.engine": engine,
                "effllm.model.parameters": s.parameters,
            }
        )

    def _set(self, attributes: dict[str, Any]) -> None:
        self.attributes.update(attributes)
        if self.span.is_recording():
            self.span.set_attributes(attributes)

    def adapter_resolved(self, key: str, content_sha256: str) -> None:
        """The exact version the request runs on (NAME@VERSION) and its content hash, on the span."""
        if self.span.is_recording():
            _name, version = split_adapter(key)
            self.span.set_attributes(
                {"effllm.adapter.version": version, "effllm.adapter.sha256": content_sha256}
            )

    def routed(self, note: RouteNote) -> None:
        """The router's decision on the span; the objective becomes a label of this request's metrics."""
        attributes: dict[str, Any] = {
            "effllm.route.objective": note.objective,
            "effllm.route.variant": note.variant,
            "effllm.route.reason": note.reason,
        }
        if note.candidates:
            attributes["effllm.route.candidates"] = note.candidates
        if note.budget_met is not None:
            attributes["effllm.route.budget_met"] = note.budget_met
        self._set(attributes)
        self.labels["effllm.objective"] = note.objective
        met = "none" if note.budget_met is None else str(note.budget_met).lower()
        # no adapter label: the name is the client's until the registry resolves it (see the module doc)
        labels = {k: v for k, v in self.labels.items() if k != "effllm.adapter"}
        self.o.instruments.routes.add(1, {**labels, "effllm.route.budget_met": met})

    def scheduled(self) -> None:
        """The request holds a batch slot: from now on it shares the energy, with its variant's engine as
        its group (telemetry/attribution.py: an interval is split per busy engine, then per request)."""
        if self.o.attributor is not None:
            self.o.attributor.start(self.start.request_id, group=self.group)
        self._running = True

    def _energy(self) -> None:
        if self._running and self.o.attributor is not None:
            share = self.o.attributor.finish(self.start.request_id, group=self.group)
            self.energy = share
            self._set({"effllm.energy_j": share.joules, "effllm.energy.source": share.source})
            self.o.instruments.energy.add(share.joules, {**self.labels, "effllm.energy.source": share.source})
        self._running = False

    def finish(self, end: RequestEnd) -> None:
        if self._done:
            return
        self._done = True
        self._energy()
        name, version = split_adapter(end.adapter or self.start.adapter)
        labels = {**self.labels, "effllm.adapter": name}
        self._set(
            {
                "gen_ai.response.model": self.model,
                "gen_ai.usage.input_tokens": end.input_tokens,
                "gen_ai.usage.output_tokens": end.output_tokens,
                "gen_ai.response.finish_reasons": [end.finish_reason],
                "effllm.adapter.name": name,
                "effllm.adapter.version": version,
                "effllm.queue_s": end.queue_s,
                "effllm.time_to_first_token_s": end.time_to_first_token_s,
                "effllm.decode_s": end.decode_s,
            }
        )
        i = self.o.instruments
        i.duration.record(end.total_s, labels)
        if end.output_tokens > 0:
            i.ttft.record(end.time_to_first_token_s, labels)
        if end.output_tokens > 1:
            i.tpot.record(end.decode_s / (end.output_tokens - 1), labels)
        i.tokens.record(end.input_tokens, {**labels, "gen_ai.token.type": "input"})
        i.tokens.record(end.output_tokens, {**labels, "gen_ai.token.type": "output"})
        self._end()

    def fail(self, code: str, message: str) -> None:
        """`code` is the gRPC status name in any case (e.g. "resource_exhausted")."""
        if self._done:
            return
        self._done = True
        self._energy()
        mark_error(code, message, self.span)
        self._error = True
        self.attributes["error.type"] = code.upper()
        labels = {**self.labels, "error.type": code.upper()}
        if code.lower() in _NAME_ERRORS and self.start.adapter:
            labels["effllm.adapter"] = INVALID_ADAPTER
            # the kept figures too (GetTelemetry's groups); the span keeps the name it asked for
            self.attributes.update({"effllm.adapter.name": INVALID_ADAPTER, "effllm.adapter.version": ""})
        self.o.instruments.duration.record(time.perf_counter() - self.started, labels)
        self._end()

    def cancelled(self) -> None:
        self.fail("cancelled", "the client went away, a deadline passed or the server drained")

    def _end(self) -> None:
        if self._own:
            self.span.end()
        ctx = self.span.get_span_context()
        self.o.keep(
            SpanRecord(
                trace_id=format(ctx.trace_id, "032x") if ctx.trace_id else "",
                span_id=format(ctx.span_id, "016x") if ctx.span_id else "",
                parent_span_id="",
                name=SPAN_PREFIX + self.model,
                kind=SPAN_KIND_SERVER,
                start_ns=self.started_ns,
                end_ns=time.time_ns(),
                attributes={k: v for k, v in self.attributes.items() if k in KEPT},
                status_code=STATUS_ERROR if self._error else 0,
            )
        )


class RequestObserver:
    """Made once per server; `begin()` per request. `attributor` None: no energy attribution.
    Keeps the last `keep_last` finished requests' figures (as span records) for `recent()`."""

    def __init__(
        self,
        served: ServedModel,
        tracer: trace.Tracer,
        instruments: Instruments,
        attributor: EnergyAttributor | None = None,
        keep_last: int = 100_000,
    ) -> None:
        self._recent: deque[SpanRecord] = deque(maxlen=keep_last)
        self._lock = threading.Lock()
        self.served = served
        self.tracer = tracer
        self.instruments = instruments
        self.attributor = attributor
        self.labels = {
            "gen_ai.provider.name": PROVIDER,
            "gen_ai.request.model": served.model,
            "effllm.precision": served.precision,
        }

    def begin(self, start: RequestStart) -> RequestTrace:
        return RequestTrace(self, start)

    def keep(self, record: SpanRecord) -> None:
        with self._lock:
            self._recent.append(record)

    def recent(self, start_s: float | None = None, end_s: float | None = None) -> list[SpanRecord]:
        """Finished requests (oldest first) that ended inside [start_s, end_s] (Unix seconds)."""
        with self._lock:
            records = list(self._recent)
        lo = -1 if start_s is None else start_s * 1e9
        hi = float("inf") if end_s is None else end_s * 1e9
        return [r for r in records if lo <= r.end_ns <= hi]


def mark_error(code: str, message: str, span: trace.Span | None = None) -> None:
    """Set ERROR status "CODE: message" and error.type on `span` (default: the current span)."""
    span = span if span is not None else trace.get_current_span()
    if span.is_recording():
        span.set_attribute("error.type", code.upper())
        span.set_status(Status(StatusCode.ERROR, f"{code.upper()}: {message}"))


def _operation(chat: bool) -> str:
    # Well-known gen_ai.operation.name values, so GenAI-aware backends recognise the span.
    return "chat" if chat else "text_completion"
