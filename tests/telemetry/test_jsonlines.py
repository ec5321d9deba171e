"""Run-dir files with a byte cap: traces.jsonl and resource-samples.jsonl rotate to `.1` and stay under the
cap, and every reader (read_spans, read_samples, `effllm report`, loadtest/traces.py) reads both files."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.trace import SpanKind

from effllm.loadtest.traces import load_spans
from effllm.telemetry.jsonlines import RotatingLines, read_lines, rotated
from effllm.telemetry.otlpjson import OtlpJsonFileExporter, read_spans
from effllm.telemetry.sampler import ResourceSampler, read_samples
from effllm.telemetry.tracing import TelemetryConfig, config_from

CAP = 4096


def test_lines_rotate_at_the_cap_and_read_back_in_order(tmp_path: Path) -> None:
    path = tmp_path / "x.jsonl"
    out = RotatingLines(path, max_bytes=100)
    for i in range(40):
        out.write(f'{{"i": {i:03d}}}')  # 13 bytes a line
    out.close()
    assert path.stat().st_size <= 100 and rotated(path).stat().st_size <= 100
    lines = read_lines(path)
    numbers = [int(line[6:9]) for line in lines]
    assert numbers == list(range(40 - len(numbers), 40)) and len(numbers) > 7  # newest, in order, none torn
    RotatingLines(path, max_bytes=0).write("x" * 500)  # 0: no cap
    assert path.stat().st_size > 500
    with pytest.raises(ValueError, match="max_bytes"):
        RotatingLines(path, max_bytes=-1)
    with pytest.raises(ValueError, match="run file cap"):
        TelemetryConfig(run_file_max_bytes=-1)
    assert config_from(env={}).run_file_max_bytes == 100 << 20


def _spans(path: Path, n: int) -> None:
    tp = TracerProvider()
    tp.add_span_processor(SimpleSpanProcessor(OtlpJsonFileExporter(path, max_bytes=CAP)))
    tracer = tp.get_tracer("t")
    for i in range(n):
        with tracer.start_as_current_span("generate M", kind=SpanKind.SERVER) as span:
            span.set_attributes(
                {
                    "gen_ai.request.model": "M",
                    "gen_ai.response.id": f"r{i}",
                    "effllm.adapter.name": "(base)",
                    "effllm.time_to_first_token_s": 0.1,
                    "effllm.decode_s": 0.2,
                    "gen_ai.usage.output_tokens": 3,
                }
            )
    tp.shutdown()


def test_traces_rotate_and_every_reader_reads_both_files(tmp_path: Path) -> None:
    path = tmp_path / "traces.jsonl"
    _spans(path, 60)  # ~60 x 700 bytes: several rotations at 4 KiB
    old = rotated(path)
    assert path.stat().st_size <= CAP and old.stat().st_size <= CAP
    ids = [int(s.attributes["gen_ai.response.id"][1:]) for s in read_spans(path)]
    assert ids == list(range(60 - len(ids), 60)) and len(ids) > len(read_spans(old))  # .1 then the file
    # loadtest: the file named, or its folder, brings the rotated one (no span twice)
    for given in (path, tmp_path):
        got = sorted(s.request_id for s in load_spans([given]))
        assert got == sorted(f"r{i}" for i in ids), given
    report = subprocess.run(
        [sys.executable, "-m", "effllm.cli.main", "report", str(path)], capture_output=True, text=True
    )
    assert report.returncode == 0, report.stderr
    (row,) = [line for line in report.stdout.splitlines() if line.startswith("(base)")]
    assert row.split()[1] == str(len(ids))


def test_resource_samples_rotate_and_read_back(tmp_path: Path) -> None:
    path = tmp_path / "resource-samples.jsonl"
    sampler = ResourceSampler(10.0, path=path, max_file_bytes=CAP).start()
    for _ in range(40):  # ~400 bytes each: several rotations (the thread adds a few of its own)
        sampler.sample()
    sampler.stop()
    assert path.stat().st_size <= CAP and rotated(path).stat().st_size <= CAP
    back = read_samples(path)
    assert len(back) > CAP // 500 and back == sampler.samples[-len(back) :]  # the newest, in order
