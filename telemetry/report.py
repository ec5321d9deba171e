"""Turn a run's traces (and its resource samples) into the per-adapter and overall table.

Input: the OTLP/JSON lines a server wrote (or any OTLP/JSON file holding our `generate {model}` spans)
and, when present, resource-samples.jsonl beside it (each with its rotated `.1`). Per group (each adapter
name, at most `max_groups` of them by request count with the rest as OTHER, then ALL):
requests and errors; p50/p90/p99 of TTFT, TPOT (decode_s / (output tokens - 1)) and E2E (arrival to
last token = TTFT + decode); AL (mean E2E); tokens/s two ways — over the wall clock of the group's
window, and the paper's IT (Σ tokens / Σ E2E); J per output token from the attributed energy with its
source; AMU, PCU and AEC from the samples inside the group's window (process-wide figures: adapters
that ran at the same time share them). Invariant: pure reading, no clock; a figure that cannot be
computed is NaN/None, never 0; the spans are bucketed in one pass and each group's resource figures come
from prefix integrals (`SampleIndex`), so the work is O(spans + groups x log samples).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from . import metrics
from .genai import SPAN_PREFIX
from .otlpjson import SPAN_KIND_SERVER, STATUS_ERROR, SpanRecord, read_spans
from .sampler import Sample, SampleIndex, WindowSummary, read_samples
from .tracing import SAMPLES_FILE

ALL = "ALL"
OTHER = "(other)"  # the adapters past max_groups, as one group
WindowFn = Callable[[float, float], WindowSummary | None]  # (start, end) -> that window's summary
QUANTILES = (50, 90, 99)


@dataclass(frozen=True)
class Quantiles:
    p50: float
    p90: float
    p99: float

    @classmethod
    def of(cls, values: Sequence[float]) -> Quantiles:
        return cls(*(metrics.percentile(values, q) for q in QUANTILES))


@dataclass(frozen=True)
class GroupReport:
    adapter: str
    requests: int
    errors: int
    input_tokens: int
    output_tokens: int
    ttft_s: Quantiles
    tpot_s: Quantiles
    e2e_s: Quantiles
    al_s: float  # EfficientLLM AL: mean E2E latency
    window_s: float
    wall_tokens_per_s: float  # Σ output tokens / window
    it_tokens_per_s: float  # EfficientLLM IT: Σ output tokens / Σ E2E
    it_tokens_per_param_s: float  # IT / parameters (NaN without the parameter count)
    energy_j: float
    j_per_token: float
    energy_source: str  # one source, or "a+b" when spans disagree; "" without energy attributes
    amu: float | None = None
    pcu: float | None = None
    aec_w: float | None = None
    # From the samples: all the meter saw in the window, idle time included (ML.ENERGY's window J/token).
    # Process-wide, so meaningful for ALL (or a run with one adapter), not for one adapter among several.
    window_energy_j: float | None = None
    window_j_per_token: float | None = None


@dataclass(frozen=True)
class Report:
    trace_file: str
    samples_file: str | None
    model: str
    groups: list[GroupReport]

    def to_json(self) -> dict[str, Any]:
        return _clean(asdict(self))


def generation_spans(spans: Sequence[SpanRecord]) -> list[SpanRecord]:
    return [s for s in spans if s.kind == SPAN_KIND_SERVER and s.name.startswith(SPAN_PREFIX)]


def _group(adapter: str, spans: Sequence[SpanRecord], resources: WindowFn) -> GroupReport:
    ok = [
        s for s in spans if s.status_code != STATUS_ERROR and "effllm.time_to_first_token_s" in s.attributes
    ]
    ttft = [float(s.attributes["effllm.time_to_first_token_s"]) for s in ok]
    e2e = [
        float(s.attributes["effllm.time_to_first_token_s"]) + float(s.attributes.get("effllm.decode_s", 0.0))
        for s in ok
    ]
    out = [int(s.attributes.get("gen_ai.usage.output_tokens", 0)) for s in ok]
    tpot = [float(s.attributes["effllm.decode_s"]) / (n - 1) for s, n in zip(ok, out, strict=True) if n > 1]
    start = min((s.start_ns for s in spans), default=0) / 1e9
    end = max((s.end_ns for s in spans), default=0) / 1e9
    window = end - start
    tokens = sum(out)
    params = next(
        (
            int(s.attributes["effllm.model.parameters"])
            for s in ok
            if "effllm.model.parameters" in s.attributes
        ),
        0,
    )
    it = metrics.inference_throughput(out, e2e) if ok and sum(e2e) > 0 else math.nan
    energy = [s for s in ok if "effllm.energy_j" in s.attributes]
    joules = sum(float(s.attributes["effllm.energy_j"]) for s in energy)
    sources = sorted({str(s.attributes.get("effllm.energy.source", "")) for s in energy})
    amu = pcu = aec = window_j = window_jpt = None
    w = resources(start, end) if spans else None
    if w is not None and w.samples >= 2:
        amu, pcu, aec, window_j = w.amu, w.pcu, w.aec_w, w.energy_j
        window_jpt = metrics.joules_per_token(w.energy_j, tokens)
    return GroupReport(
        adapter=adapter,
        requests=len(spans),
        errors=len(spans) - len(ok),
        input_tokens=sum(int(s.attributes.get("gen_ai.usage.input_tokens", 0)) for s in ok),
        output_tokens=tokens,
        ttft_s=Quantiles.of(ttft),
        tpot_s=Quantiles.of(tpot),
        e2e_s=Quantiles.of(e2e),
        al_s=metrics.average_latency(e2e) if e2e else math.nan,
        window_s=window,
        wall_tokens_per_s=metrics.wall_throughput(tokens, window) if window > 0 else math.nan,
        it_tokens_per_s=it,
        it_tokens_per_param_s=it / params if params and not math.isnan(it) else math.nan,
        energy_j=joules if energy else math.nan,
        j_per_token=metrics.joules_per_token(joules, tokens) if energy else math.nan,
        energy_source="+".join(sources),
        window_energy_j=window_j,
        window_j_per_token=window_jpt,
        amu=amu,
        pcu=pcu,
        aec_w=aec,
    )


def build_report(trace_file: Path, samples_file: Path | None = None) -> Report:
    """`samples_file` None: resource-samples.jsonl beside the trace file, if it is there."""
    spans = generation_spans(read_spans(trace_file))
    if samples_file is None and (trace_file.parent / SAMPLES_FILE).exists():
        samples_file = trace_file.parent / SAMPLES_FILE
    samples = read_samples(samples_file) if samples_file is not None else []
    model = next((str(s.attributes.get("gen_ai.request.model", "")) for s in spans), "")
    return Report(
        str(trace_file), str(samples_file) if samples_file else None, model, group_reports(spans, samples)
    )


def group_reports(
    spans: Sequence[SpanRecord],
    samples: Sequence[Sample] = (),
    *,
    window: WindowFn | None = None,
    max_groups: int | None = None,
) -> list[GroupReport]:
    """One GroupReport per adapter name (sorted), then ALL; from spans read back or kept in memory.
    `window`: the resource summary of a time window (default: over `samples`, indexed once);
    `max_groups`: keep the names with the most requests, the rest go into one OTHER group (0: ALL only)."""
    if window is None:
        window = SampleIndex(samples).summary
    by_adapter: dict[str, list[SpanRecord]] = {}
    for s in spans if max_groups != 0 else ():  # 0: no per-adapter buckets at all
        by_adapter.setdefault(str(s.attributes.get("effllm.adapter.name", "")), []).append(s)
    if max_groups is not None and len(by_adapter) > max_groups:
        kept = set(sorted(by_adapter, key=lambda name: (-len(by_adapter[name]), name))[:max_groups])
        other = [s for name, group in by_adapter.items() if name not in kept for s in group]
        by_adapter = {name: by_adapter[name] for name in kept}
        groups = [_group(name, by_adapter[name], window) for name in sorted(by_adapter)]
        groups.append(_group(OTHER, other, window))
    else:
        groups = [_group(name, by_adapter[name], window) for name in sorted(by_adapter)]
    if spans:
        groups.append(_group(ALL, spans, window))
    return groups


COLUMNS = (
    ("adapter", "adapter", "{}"),
    ("requests", "req", "{}"),
    ("errors", "err", "{}"),
    ("ttft_s.p50", "TTFT p50", "{:.3f}"),
    ("ttft_s.p90", "p90", "{:.3f}"),
    ("ttft_s.p99", "p99", "{:.3f}"),
    ("tpot_s.p50", "TPOT p50", "{:.4f}"),
    ("tpot_s.p90", "p90", "{:.4f}"),
    ("tpot_s.p99", "p99", "{:.4f}"),
    ("e2e_s.p50", "E2E p50", "{:.3f}"),
    ("e2e_s.p90", "p90", "{:.3f}"),
    ("e2e_s.p99", "p99", "{:.3f}"),
    ("output_tokens", "out tok", "{}"),
    ("wall_tokens_per_s", "tok/s", "{:.1f}"),
    ("it_tokens_per_s", "IT tok/s", "{:.1f}"),
    ("j_per_token", "J/tok", "{:.3f}"),
    ("energy_source", "source", "{}"),
    ("amu", "AMU", "{:.3f}"),
    ("pcu", "PCU", "{:.3f}"),
    ("aec_w", "AEC W", "{:.1f}"),
)


def format_table(report: Report) -> str:
    """A plain-text table, one row per adapter and one ALL row; units: s, tokens/s, J, W, ratios."""
    rows = [[head for _, head, _ in COLUMNS]]
    for g in report.groups:
        row = []
        for path, _, fmt in COLUMNS:
            value: Any = g
            for part in path.split("."):
                value = getattr(value, part)
            row.append(
                "-"
                if value is None or value == "" or (isinstance(value, float) and math.isnan(value))
                else fmt.format(value)
            )
        rows.append(row)
    widths = [max(len(r[i]) for r in rows) for i in range(len(COLUMNS))]
    lines = [
        "  ".join(
            cell.rjust(w) if i else cell.ljust(w) for i, (cell, w) in enumerate(zip(r, widths, strict=True))
        )
        for r in rows
    ]
    title = f"{report.model or 'model ?'}: {report.trace_file}" + (
        f" (+ {report.samples_file})" if report.samples_file else " (no resource samples: AMU/PCU/AEC -)"
    )
    return "\n".join([title, *lines])


def _clean(node: Any) -> Any:
    """NaN -> None so the JSON is standard."""
    if isinstance(node, float) and math.isnan(node):
        return None
    if isinstance(node, dict):
        return {k: _clean(v) for k, v in node.items()}
    if isinstance(node, list):
        return [_clean(v) for v in node]
    return node


def write_json(report: Report, path: Path) -> None:
    path.write_text(json.dumps(report.to_json(), indent=2) + "\n")
