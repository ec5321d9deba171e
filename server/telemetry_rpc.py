"""GetTelemetry: the server's resource samples and per-request figures over a window, and their summary.

The figures are the ones the server's telemetry already keeps (the resource sampler's samples, the request
observer's finished requests); the summary is telemetry/report.py's, so a remote load campaign reports the
same AMU, PCU, AEC, energy (with its source) and J/token as one that reads the server's run dir.
Who sees what (docs/security.md): the admin role (anyone, with auth off) gets every request's figures and
one group per adapter; any other caller the aggregate only (resources, samples, the ALL group): no
request id, adapter name, token count, variant or objective of anyone's request.
Invariant: read-only and torch-free; a window with nothing in it answers empty fields, never an error; the
work is bounded whatever the uptime (the kept records and samples are capped, a window's resource figures
cost O(log samples), at most MAX_GROUPS adapter groups), and a reply that would pass a cap (MAX_REQUESTS,
MAX_SAMPLES, the message size) is refused RESOURCE_EXHAUSTED naming the field to narrow. The service runs
it off the event loop (asyncio.to_thread).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

from ..api.v1 import generation_pb2 as pb
from ..telemetry.report import group_reports
from .engines.base import EffllmError

if TYPE_CHECKING:
    from ..telemetry.serving import ServerTelemetry

MAX_SAMPLES = 20_000  # include_samples: a window with more is refused (about 1 MB of samples)
MAX_REQUESTS = 20_000  # per-request figures: a window with more is refused (a few MB)
MAX_GROUPS = 64  # adapter groups: the names with the most requests, the rest as one "(other)" group


def _opt(value: float | None) -> float | None:
    return None if value is None or (isinstance(value, float) and math.isnan(value)) else float(value)


def _too_many(what: str, n: int, cap: int) -> EffllmError:
    return EffllmError(
        "resource_exhausted",
        f"start_unix_s, end_unix_s: the window holds {n} {what}, more than one reply carries ({cap}): "
        "ask for a narrower window",
    )


def telemetry_reply(
    tel: ServerTelemetry | None,
    req: pb.GetTelemetryRequest,
    model: str,
    precision: str,
    engine: str,
    *,
    now: float,
    full: bool = True,
    max_bytes: int = 16 << 20,
) -> pb.Telemetry:
    """`tel` None: the server runs without telemetry (enabled=false, nothing else set). `full`: the caller
    may see per-request figures and adapter names (the admin role); else the aggregate only. `now`: the
    open end of the window. Raises EffllmError("resource_exhausted") past a cap."""
    start = req.start_unix_s or None
    end = req.end_unix_s or now
    out = pb.Telemetry(model=model, precision=precision, engine=engine, end_unix_s=end)
    if tel is None:
        return out
    out.enabled = True
    if req.include_samples and (n := tel.sample_count(start, end)) > MAX_SAMPLES:
        raise _too_many("resource samples (include_samples)", n, MAX_SAMPLES)
    spans = tel.observer.recent(start, end)
    if full and len(spans) > MAX_REQUESTS:
        raise _too_many("requests", len(spans), MAX_REQUESTS)
    w, samples = (
        tel.resources_and_samples(start, end) if req.include_samples else (tel.resources(start, end), [])
    )
    out.start_unix_s = start or (w.start if w is not None else end)
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
            for s in samples
        )
    if full:
        out.requests.extend(_figures(span.attributes, span.start_ns, span.end_ns) for span in spans)
    groups = group_reports(spans, window=tel.resources, max_groups=MAX_GROUPS if full else 0)
    for g in groups:  # per adapter (full), then ALL
        row = pb.GroupFigures(
            adapter=g.adapter,
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
    if (size := out.ByteSize()) > max_bytes:
        raise EffllmError(
            "resource_exhausted",
            f"start_unix_s, end_unix_s: the reply would be {size} bytes, over this server's message cap of "
            f"{max_bytes}: ask for a narrower window"
            + (" or leave include_samples off" if req.include_samples else ""),
        )
    return out


def _figures(a: dict[str, Any], start_ns: int, end_ns: int) -> pb.RequestFigures:
    name, version = str(a.get("effllm.adapter.name", "")), str(a.get("effllm.adapter.version", ""))
    figures = pb.RequestFigures(
        request_id=str(a.get("gen_ai.response.id", "")),
        adapter=f"{name}@{version}" if version else ("" if name == "(base)" else name),
        start_unix_s=start_ns / 1e9,
        end_unix_s=end_ns / 1e9,
        input_tokens=int(a.get("gen_ai.usage.input_tokens", 0)),
        output_tokens=int(a.get("gen_ai.usage.output_tokens", 0)),
        queue_s=float(a.get("effllm.queue_s", 0.0)),
        time_to_first_token_s=float(a.get("effllm.time_to_first_token_s", 0.0)),
        decode_s=float(a.get("effllm.decode_s", 0.0)),
        energy_source=str(a.get("effllm.energy.source", "")),
        error=str(a.get("error.type", "")),
        variant=str(a.get("effllm.route.variant", "")),
        objective=str(a.get("effllm.route.objective", "")),
        model=str(a.get("effllm.model", "")),
    )
    if "effllm.energy_j" in a:
        figures.energy_j = float(a["effllm.energy_j"])
    return figures
