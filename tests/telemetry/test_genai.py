"""RequestObserver with the real SDK (in-memory span exporter and metric reader): names, attributes,
labels, bucket advice, error status and energy attribution."""

from __future__ import annotations

from pathlib import Path

import pytest
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

from effllm.telemetry.attribution import EnergyAttributor
from effllm.telemetry.energy import RaplMeter
from effllm.telemetry.genai import (
    TTFT_BUCKETS,
    Instruments,
    RequestEnd,
    RequestObserver,
    RequestStart,
    RouteNote,
    ServedModel,
    register_variant_gauge,
    split_adapter,
)


@pytest.fixture
def setup(tmp_path: Path):  # type: ignore[no-untyped-def]
    spans = InMemorySpanExporter()
    tp = TracerProvider()
    tp.add_span_processor(SimpleSpanProcessor(spans))
    reader = InMemoryMetricReader()
    mp = MeterProvider(metric_readers=[reader])
    zone = tmp_path / "intel-rapl:0"
    zone.mkdir()
    (zone / "max_energy_range_uj").write_text("1000000000\n")
    (zone / "energy_uj").write_text("0\n")
    observer = RequestObserver(
        ServedModel("M", "fp32", "vllm", 135),
        tp.get_tracer("t"),
        Instruments(mp.get_meter("t")),
        EnergyAttributor(RaplMeter(tmp_path)),
    )
    return observer, spans, reader, zone / "energy_uj"


def _points(reader: InMemoryMetricReader) -> dict[str, list]:  # type: ignore[type-arg]
    out: dict[str, list] = {}  # type: ignore[type-arg]
    data = reader.get_metrics_data()
    for rm in data.resource_metrics:
        for sm in rm.scope_metrics:
            for metric in sm.metrics:
                out[metric.name] = list(metric.data.data_points)
    return out


def test_split_adapter() -> None:
    assert split_adapter("") == ("(base)", "")
    assert split_adapter("a") == ("a", "")
    assert split_adapter("a@v2") == ("a", "v2")


def test_finished_request(setup) -> None:  # type: ignore[no-untyped-def]
    observer, spans, reader, energy_file = setup
    t = observer.begin(RequestStart("r1", True, 16, 0.5, 0.9, "sql"))
    t.scheduled()
    energy_file.write_text("3000000\n")  # 3 J while it ran alone
    t.finish(RequestEnd(7, 5, "length", "sql@v2", 0.01, 0.2, 0.4, 0.6))
    (span,) = spans.get_finished_spans()
    assert span.name == "generate M" and span.kind == SpanKind.SERVER
    a = span.attributes
    assert a["gen_ai.operation.name"] == "chat" and a["gen_ai.provider.name"] == "effllm"
    assert a["gen_ai.request.model"] == "M" and a["gen_ai.request.max_tokens"] == 16
    assert a["gen_ai.request.temperature"] == 0.5 and a["gen_ai.request.top_p"] == pytest.approx(0.9)
    assert a["gen_ai.usage.input_tokens"] == 7 and a["gen_ai.usage.output_tokens"] == 5
    assert tuple(a["gen_ai.response.finish_reasons"]) == ("length",) and a["gen_ai.response.id"] == "r1"
    assert a["effllm.adapter.name"] == "sql" and a["effllm.adapter.version"] == "v2"
    assert a["effllm.precision"] == "fp32" and a["effllm.engine"] == "vllm"
    assert (
        a["effllm.queue_s"] == 0.01
        and a["effllm.time_to_first_token_s"] == 0.2
        and a["effllm.decode_s"] == 0.4
    )
    assert a["effllm.energy_j"] == pytest.approx(3.0) and a["effllm.energy.source"] == "measured-rapl"
    points = _points(reader)
    (ttft,) = points["gen_ai.server.time_to_first_token"]
    assert ttft.count == 1 and ttft.sum == pytest.approx(0.2)
    assert tuple(ttft.explicit_bounds) == TTFT_BUCKETS
    assert ttft.attributes["effllm.adapter"] == "sql" and ttft.attributes["effllm.precision"] == "fp32"
    (tpot,) = points["gen_ai.server.time_per_output_token"]
    assert tpot.sum == pytest.approx(0.4 / 4)
    usage = {p.attributes["gen_ai.token.type"]: p.sum for p in points["gen_ai.client.token.usage"]}
    assert usage == {"input": 7, "output": 5}
    (energy,) = points["effllm.energy"]
    assert energy.value == pytest.approx(3.0)


def test_failed_request_sets_error_status(setup) -> None:  # type: ignore[no-untyped-def]
    observer, spans, reader, _ = setup
    t = observer.begin(RequestStart("r2", False, 8, 1.0, 1.0, ""))
    t.fail("resource_exhausted", "server busy")
    t.cancelled()  # a second outcome is ignored
    (span,) = spans.get_finished_spans()
    assert span.status.status_code == StatusCode.ERROR
    assert span.status.description == "RESOURCE_EXHAUSTED: server busy"
    assert span.attributes["error.type"] == "RESOURCE_EXHAUSTED"
    assert span.attributes["gen_ai.operation.name"] == "text_completion"
    assert "effllm.energy_j" not in span.attributes  # it never ran
    (duration,) = _points(reader)["gen_ai.server.request.duration"]
    assert duration.attributes["error.type"] == "RESOURCE_EXHAUSTED"
    assert duration.attributes["effllm.adapter"] == "(base)"


def test_refused_adapter_names_do_not_become_metric_labels(setup) -> None:  # type: ignore[no-untyped-def]
    observer, spans, reader, _ = setup
    observer.begin(RequestStart("r3", False, 8, 1.0, 1.0, "random-name-123")).fail("not_found", "no adapter")
    observer.begin(RequestStart("r4", False, 8, 1.0, 1.0, "sql")).fail("resource_exhausted", "busy")
    names = {p.attributes["effllm.adapter"] for p in _points(reader)["gen_ai.server.request.duration"]}
    assert names == {"(invalid)", "sql"}  # a refusal for load keeps its (valid) adapter's label
    assert spans.get_finished_spans()[0].attributes["effllm.adapter.name"] == "random-name-123"


def test_a_routed_request_carries_its_variant_and_objective(setup) -> None:  # type: ignore[no-untyped-def]
    observer, spans, reader, energy_file = setup
    t = observer.begin(RequestStart("r5", False, 8, 1.0, 1.0, "", "int4:hf", "int4", "hf"))
    t.routed(RouteNote("energy", "int4:hf", "energy: lowest joules per token", '{"int4:hf":{}}', True))
    t.scheduled()
    energy_file.write_text("2000000\n")  # 2 J while it ran alone
    t.finish(RequestEnd(3, 4, "length", "", 0.0, 0.1, 0.3, 0.4))
    assert t.energy is not None and t.energy.joules == pytest.approx(2.0)  # the runner puts it on usage
    a = spans.get_finished_spans()[0].attributes
    assert a["effllm.route.objective"] == "energy" and a["effllm.route.variant"] == "int4:hf"
    assert a["effllm.route.reason"].startswith("energy") and a["effllm.route.candidates"] == '{"int4:hf":{}}'
    assert a["effllm.route.budget_met"] is True
    assert a["effllm.precision"] == "int4" and a["effllm.engine"] == "hf"  # the variant's, not the server's
    points = _points(reader)
    (ttft,) = points["gen_ai.server.time_to_first_token"]
    assert ttft.attributes["effllm.variant"] == "int4:hf" and ttft.attributes["effllm.objective"] == "energy"
    assert ttft.attributes["effllm.precision"] == "int4"
    (decision,) = points["effllm.route.decisions"]
    assert decision.value == 1 and decision.attributes["effllm.route.budget_met"] == "true"
    assert "effllm.adapter" not in decision.attributes


def test_requests_on_two_variants_share_energy_per_engine(setup) -> None:  # type: ignore[no-untyped-def]
    """The trace passes its variant to the attributor: one int4 request beside three fp32 ones gets half
    of an interval (its engine's share), each fp32 one a sixth; a server's own variant is its group."""
    observer, _spans, _reader, energy_file = setup
    fp32 = [
        observer.begin(RequestStart(f"f{i}", False, 8, 1.0, 1.0, "", "fp32:hf", "fp32", "hf"))
        for i in range(3)
    ]
    int4 = observer.begin(RequestStart("i0", False, 8, 1.0, 1.0, "", "int4:hf", "int4", "hf"))
    plain = observer.begin(RequestStart("p0", False, 8, 1.0, 1.0, ""))  # no variant: the server's fp32:vllm
    for t in (*fp32, int4):
        t.scheduled()
    energy_file.write_text("6000000\n")  # 6 J with both engines busy: 3 J each
    end = RequestEnd(3, 4, "length", "", 0.0, 0.1, 0.3, 0.4)
    for t in (*fp32, int4):
        t.finish(end)
    plain.scheduled()
    assert observer.attributor is not None and observer.attributor.busy_groups() == ("fp32:vllm",)
    plain.finish(end)
    assert int4.energy is not None and int4.energy.joules == pytest.approx(3.0)
    assert all(t.energy is not None and t.energy.joules == pytest.approx(1.0) for t in fp32)


def test_the_variant_gauge_shows_a_dead_variant() -> None:
    reader = InMemoryMetricReader()
    states = {"bf16:vllm": True, "int4:hf": True}
    register_variant_gauge(MeterProvider(metric_readers=[reader]).get_meter("t"), lambda: states)
    states["bf16:vllm"] = False
    points = _points(reader)["effllm.variant.alive"]
    assert {p.attributes["effllm.variant"]: p.value for p in points} == {"bf16:vllm": 0, "int4:hf": 1}


def test_requests_on_two_models_carry_their_model_and_share_energy_per_engine(setup) -> None:  # type: ignore[no-untyped-def]
    """A server hosting several models: each request's span and metrics name its model, and the same
    variant name on two models is two engines for the energy split."""
    observer, spans, reader, energy_file = setup
    on_m = observer.begin(RequestStart("m0", False, 8, 1.0, 1.0, "", "fp32:hf", "fp32", "hf", "M"))
    on_b = observer.begin(RequestStart("b0", False, 8, 1.0, 1.0, "", "fp32:hf", "fp32", "hf", "b"))
    for t in (on_m, on_b):
        t.scheduled()
    energy_file.write_text("4000000\n")  # 4 J with both engines busy: 2 J each
    assert observer.attributor is not None
    assert sorted(observer.attributor.busy_groups()) == ["b/fp32:hf", "fp32:hf"]
    end = RequestEnd(3, 4, "length", "", 0.0, 0.1, 0.3, 0.4)
    for t in (on_m, on_b):
        t.finish(end)
    assert on_b.energy is not None and on_b.energy.joules == pytest.approx(2.0)
    by_id = {s.attributes["gen_ai.response.id"]: s for s in spans.get_finished_spans()}
    b0 = by_id["b0"].attributes
    assert b0["effllm.model"] == "b" and b0["gen_ai.request.model"] == "b"
    assert by_id["b0"].name.endswith(" b") and by_id["m0"].attributes["effllm.model"] == "M"
    durations = _points(reader)["gen_ai.server.request.duration"]
    assert sorted(p.attributes["effllm.model"] for p in durations) == ["M", "b"]
