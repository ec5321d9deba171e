"""`effllm report` on a trace file and samples laid out as a server run leaves them, numbers by hand."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from dataclasses import asdict, replace
from pathlib import Path

import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.trace import SpanKind, StatusCode, Tracer

from effllm.telemetry.otlpjson import OtlpJsonFileExporter, read_spans
from effllm.telemetry.report import ALL, OTHER, build_report, format_table, generation_spans, group_reports
from effllm.telemetry.sampler import Sample, read_samples

T0 = 1_800_000_000.0  # Unix seconds of the run's start
S = 1_000_000_000


def _span(
    tracer: Tracer,
    start: float,
    end: float,
    adapter: str,
    ttft: float,
    decode: float,
    out: int,
    energy: float,
    error: bool = False,
) -> None:
    span = tracer.start_span(
        "generate M",
        kind=SpanKind.SERVER,
        start_time=int((T0 + start) * S),
        attributes={
            "gen_ai.request.model": "M",
            "effllm.adapter.name": adapter,
            "effllm.model.parameters": 1000,
        },
    )
    if error:
        span.set_status(StatusCode.ERROR, "RESOURCE_EXHAUSTED: busy")
    else:
        span.set_attributes(
            {
                "effllm.time_to_first_token_s": ttft,
                "effllm.decode_s": decode,
                "gen_ai.usage.output_tokens": out,
                "gen_ai.usage.input_tokens": 3,
                "effllm.energy_j": energy,
                "effllm.energy.source": "estimated",
            }
        )
    span.end(end_time=int((T0 + end) * S))


@pytest.fixture
def run_dir(tmp_path: Path) -> Path:
    tp = TracerProvider()
    tp.add_span_processor(SimpleSpanProcessor(OtlpJsonFileExporter(tmp_path / "traces.jsonl")))
    tracer = tp.get_tracer("t")
    _span(tracer, 0, 2, "sql", ttft=0.5, decode=1.5, out=4, energy=8.0)  # tpot 0.5
    _span(tracer, 1, 4, "sql", ttft=1.0, decode=2.0, out=11, energy=12.0)  # tpot 0.2
    _span(tracer, 2, 3, "(base)", ttft=0.2, decode=0.8, out=5, energy=4.0)  # tpot 0.2
    _span(tracer, 3, 3.1, "(base)", 0, 0, 0, 0, error=True)
    with tracer.start_as_current_span("/grpc.health.v1.Health/Check", kind=SpanKind.SERVER):
        pass  # not a generation: ignored
    tp.shutdown()
    with (tmp_path / "resource-samples.jsonl").open("w") as f:
        for i in range(5):  # t = 0..4 s: memory 0.1..0.5, utilisation 0.5, power 20 W
            s = Sample(
                t=T0 + i,
                memory_utilisation=0.1 * (i + 1),
                utilisation=0.5,
                power_w=20.0,
                energy_j=20.0 * i,
                energy_source="estimated",
                rss_bytes=100,
                system_memory_used_bytes=0,
                system_memory_total_bytes=1000,
                cpu_utilisation=0.5,
            )
            f.write(json.dumps(asdict(s)) + "\n")
    return tmp_path


def test_report_numbers(run_dir: Path) -> None:
    r = build_report(run_dir / "traces.jsonl")
    assert r.model == "M" and r.samples_file == str(run_dir / "resource-samples.jsonl")
    groups = {g.adapter: g for g in r.groups}
    assert list(groups) == ["(base)", "sql", "ALL"]
    sql, base, total = groups["sql"], groups["(base)"], groups["ALL"]
    assert (sql.requests, sql.errors, sql.output_tokens) == (2, 0, 15)
    assert sql.ttft_s.p50 == pytest.approx(0.75) and sql.ttft_s.p90 == pytest.approx(0.95)
    assert sql.tpot_s.p50 == pytest.approx(0.35)
    assert sql.e2e_s.p50 == pytest.approx(2.5) and sql.al_s == pytest.approx(2.5)
    assert sql.window_s == pytest.approx(4.0) and sql.wall_tokens_per_s == pytest.approx(15 / 4)
    assert sql.it_tokens_per_s == pytest.approx(15 / 5)  # Σ tokens / Σ E2E
    assert sql.it_tokens_per_param_s == pytest.approx(15 / 5 / 1000)
    assert sql.j_per_token == pytest.approx(20 / 15) and sql.energy_source == "estimated"
    assert sql.amu == pytest.approx(0.3) and sql.pcu == pytest.approx(0.5) and sql.aec_w == pytest.approx(20)
    assert sql.window_energy_j == pytest.approx(80.0)  # samples t=0..4: 0 -> 80 J
    assert sql.window_j_per_token == pytest.approx(80 / 15)
    assert (base.requests, base.errors, base.output_tokens) == (2, 1, 5)
    assert base.amu == pytest.approx(0.35)  # window [2, 3.1] holds the samples at t=2 (0.3) and t=3 (0.4)
    assert (total.requests, total.errors, total.output_tokens) == (4, 1, 20)
    assert total.j_per_token == pytest.approx(24 / 20)
    table = format_table(r)
    assert "ALL" in table and "estimated" in table and "J/tok" in table


def test_report_cli_table_and_json(run_dir: Path) -> None:
    out = run_dir / "report.json"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "effllm.cli.main",
            "report",
            str(run_dir / "traces.jsonl"),
            "--json",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[1].split()[:3] == ["adapter", "req", "err"]
    assert [ln.split()[0] for ln in lines[2:5]] == ["(base)", "sql", "ALL"]
    data = json.loads(out.read_text())
    assert [g["adapter"] for g in data["groups"]] == ["(base)", "sql", "ALL"]
    assert data["groups"][2]["requests"] == 4
    assert data["groups"][0]["tpot_s"]["p50"] == pytest.approx(0.2)


def test_report_cli_errors(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "effllm.cli.main", "report", str(tmp_path / "nope.jsonl")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2 and "no such file" in proc.stderr
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    proc = subprocess.run(
        [sys.executable, "-m", "effllm.cli.main", "report", str(empty)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 1 and "no generation spans" in proc.stderr


def test_nan_becomes_null(run_dir: Path) -> None:
    r = build_report(run_dir / "traces.jsonl")
    j = r.to_json()
    base = j["groups"][0]
    assert base["adapter"] == "(base)"
    assert not any(isinstance(v, float) and math.isnan(v) for v in base.values())


def test_groups_are_capped_with_the_rest_as_other(run_dir: Path) -> None:
    """Many adapter names (a client can mint them): the names with the most requests, then OTHER, then ALL;
    the samples are indexed once, whatever the number of groups."""
    spans = generation_spans(read_spans(run_dir / "traces.jsonl"))
    samples = read_samples(run_dir / "resource-samples.jsonl")
    many = [
        *spans,
        *(
            replace(spans[0], attributes={**spans[0].attributes, "effllm.adapter.name": f"n{i}"})
            for i in range(50)
        ),
    ]
    groups = group_reports(many, samples, max_groups=2)
    assert [(g.adapter, g.requests) for g in groups] == [("(base)", 2), ("sql", 2), (OTHER, 50), (ALL, 54)]
    assert groups[0].amu is not None and groups[2].amu is not None
    assert [g.adapter for g in group_reports(spans, samples)] == ["(base)", "sql", ALL]
    assert [(g.adapter, g.requests) for g in group_reports(spans, samples, max_groups=0)] == [(ALL, 4)]
