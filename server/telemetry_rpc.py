"""GetTelemetry: the server's resource samples and per-request figures over a window, and their summary.

The figures are the ones the server's telemetry already keeps (the resource sampler's samples, the request
observer's finished requests); the summary is telemetry/report.py's, so a remote load campaign reports the
same AMU, PCU, AEC, energy (with its source) and J/token as one that reads the server's run dir.
Invariant: read-only and torch-free; a window with nothing in it answers empty fields, never an error.
"""

from __future__ import annotations

import math
import time
from typing import TYPE_CHECKING

from ..api.v1 import generation_pb2 as pb
from ..telemetry.report import ALL, group_reports
from ..telemetry.sampler import summarize

if TYPE_CHECKING:
    from ..telemetry.serving import ServerTelemetry

MAX_SAMPLES = 100_000  # include_samples: at most this many (the latest), so a reply stays small


def _opt(value: float | None) -> float | None:
    return None if value is None or (isinstance(value, float) and math.isnan(value)) else float(value)


def telemetry_reply(
    tel: ServerTelemetry | None, req: pb.GetTelemetryRequest, model: str, precision: str, engine: str
) -> pb.Telemetry:
    """`tel` None: the server runs without telemetry (enabled=false, nothing else set)."""
    start = req.start_unix_s or None
    end = req.end_unix_s or time.time()
    out = pb.Telemetry(model=model, precision=precision, engine=engine, end_unix_s=end)
    if tel is None:
        return out
    out.enabled = True
    samples, spans = tel.window(start, end)
    out.start_unix_s = start or (samples[0].t if samples else end)
    if samples:
        try:
            w = summarize(samples)
        except ValueError:  # mixed energy sources: report none rather than a wrong sum
            w = None
        if w is not None:
            out.resources.CopyFrom(
                pb.ResourceSummary(
                    samples=w.samples,
                    window_s=w.duration_s,
                    amu=w.amu,
                    amu_bytes=w.amu_bytes,
                    peak_memory_bytes=w.peak_memory_bytes,
                    pcu=w.pcu,
                    aec_w=w.aec_w,
                    energy_j=w.energy_j,
                    energy_source=w.energy_source,
                    device=w.device,
                )
            )
        if req.include_samples:
            out.samples.extend(
                pb.ResourceSample(
                    t_unix_s=s.t,
                    memory_utilisation=s.memory_utilisation,
                    utilisation=s.utilisation,
                    power_w=s.power_w,
                    energy_j=s.energy_j,
                    memory_used_bytes=s.memory_used_bytes,
                )
                for s in samples[-MAX_SAMPLES:]
            )
    for span in spans:
        a = span.attributes
        name, version = str(a.get("effllm.adapter.name", "")), str(a.get("effllm.adapter.version", ""))
        figures = pb.RequestFigures(
            request_id=str(a.get("gen_ai.response.id", "")),
            adapter=f"{name}@{version}" if version else ("" if name == "(base)" else name),
            start_unix_s=span.start_ns / 1e9,
            end_unix_s=span.end_ns / 1e9,
            input_tokens=int(a.get("gen_ai.usage.input_tokens", 0)),
            output_tokens=int(a.get("gen_ai.usage.output_tokens", 0)),
            queue_s=float(a.get("effllm.queue_s", 0.0)),
            time_to_first_token_s=float(a.get("effllm.time_to_first_token_s", 0.0)),
            decode_s=float(a.get("effllm.decode_s", 0.0)),
            energy_source=str(a.get("effllm.energy.source", "")),
            error=str(a.get("error.type", "")),
            variant=str(a.get("effllm.route.variant", "")),
            objective=str(a.get("effllm.route.objective", "")),
        )
        if "effllm.energy_j" in a:
            figures.energy_j = float(a["effllm.energy_j"])
        out.requests.append(figures)
    for g in group_reports(spans, samples):
        row = pb.GroupFigures(
            adapter=g.adapter if g.adapter != ALL else ALL,
            precision=precision,
            requests=g.requests,
            errors=g.errors,
            output_tokens=g.output_tokens,
            energy_source=g.energy_source,
        )
        for field, value in (
            ("energy_j", g.energy_j),
            ("j_per_token", g.j_per_token),
            ("amu", g.amu),
            ("pcu", g.pcu),
            ("aec_w", g.aec_w),
        ):
            v = _opt(value)
            if v is not None:
                setattr(row, field, v)
        out.groups.append(row)
    return out
