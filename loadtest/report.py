"""Turn one campaign's raw results into one report (a plain dict, written as JSON).

Sources: the Locust user's per-request rows (requests-*.jsonl), Locust's stats CSV, the server's spans
(loadtest/traces.py) and the server process watch (loadtest/resources.py), plus GetStats/GetModelInfo
taken before and after. Invariants: every number says its unit in its key; energy figures carry their
source; throughput is given both as tokens / wall time and as the paper's IT = Σ tokens / Σ latencies;
nothing is filled in that was not measured (missing -> None).
Requests that stated an objective (`effllm load --objectives`) also get a per-objective table
(`per_objective`: latency quantiles, J/token from each reply's usage.energy_joules, budget met, variant
shares); without objectives the report has no such key. Requests that named a base model
(`effllm load --models`) get the same table per model (`per_model`).
"""

from __future__ import annotations

import csv
import json
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..telemetry import metrics
from .traces import ServerSpan, join


@dataclass(frozen=True)
class Slo:
    """Goodput targets in seconds; None = no bound on that figure."""

    ttft_s: float | None = None
    tpot_s: float | None = None
    e2e_s: float | None = None

    @classmethod
    def parse(cls, text: str) -> Slo:
        """`ttft=0.5,tpot=0.1[,e2e=5]` (seconds)."""
        kw: dict[str, float] = {}
        for part in filter(None, (p.strip() for p in text.split(","))):
            key, _, val = part.partition("=")
            if key not in ("ttft", "tpot", "e2e") or not val:
                raise ValueError(f"--slo {part!r}: use ttft=S, tpot=S, e2e=S (seconds)")
            kw[f"{key}_s"] = float(val)
        return cls(**kw)

    def met(self, row: dict[str, Any]) -> bool:
        if row.get("status") != "OK":
            return False
        for key, bound in (("ttft_s", self.ttft_s), ("tpot_s", self.tpot_s), ("e2e_s", self.e2e_s)):
            if bound is not None and row.get(key) is not None and row[key] > bound:
                return False
        return True


def read_rows(run_dir: Path) -> list[dict[str, Any]]:
    rows = []
    for f in sorted(run_dir.glob("requests-*.jsonl")):
        rows += [json.loads(line) for line in f.read_text().splitlines() if line.strip()]
    return sorted(rows, key=lambda r: r["t_start"])


def read_locust_stats(prefix: Path) -> dict[str, dict[str, float | None]]:
    """Locust's `<prefix>_stats.csv`: name -> {requests, failures, median_ms, mean_ms, p90_ms, p99_ms}."""
    path = Path(f"{prefix}_stats.csv")
    if not path.exists():
        return {}

    def num(x: str | None) -> float | None:
        try:
            return float(x) if x else None
        except ValueError:  # Locust writes N/A where a name has no samples
            return None

    # final counts: Locust rewrites its CSV every second, its JSON once at shutdown (after the last event)
    final: dict[str, tuple[float, float]] = {}
    json_path = Path(f"{prefix}_stats.json")
    if json_path.exists():
        for e in json.loads(json_path.read_text()):
            final[e["name"]] = (float(e["num_requests"]), float(e["num_failures"]))
    out: dict[str, dict[str, float | None]] = {}
    with path.open() as fh:
        for rec in csv.DictReader(fh):
            counts = final.get(rec["Name"])
            out[rec["Name"]] = {
                "requests": counts[0] if counts else num(rec["Request Count"]),
                "failures": counts[1] if counts else num(rec["Failure Count"]),
                "median_ms": num(rec["Median Response Time"]),
                "mean_ms": num(rec["Average Response Time"]),
                "p90_ms": num(rec.get("90%")),
                "p99_ms": num(rec.get("99%")),
            }
    return out


def quantiles(xs: list[float]) -> dict[str, float | None]:
    """n, mean, p50/p90/p99 and max; percentiles are telemetry's (`effllm report` reads the same data the
    same way: linear interpolation between closest ranks)."""
    if not xs:
        return {"n": 0, "mean": None, "p50": None, "p90": None, "p99": None, "max": None}
    q = {f"p{p}": metrics.percentile(xs, p) for p in (50, 90, 99)}
    return {"n": len(xs), "mean": sum(xs) / len(xs), **q, "max": max(xs)}


def _wall(rows: list[dict[str, Any]]) -> tuple[float, float]:
    t0 = min(r["t_start"] for r in rows)
    t1 = max(r.get("t_end", r["t_start"]) for r in rows)
    return t0, t1


def token_times(row: dict[str, Any]) -> list[float]:
    """When each output token of an OK row reached the client (unix s): the first at t_start + TTFT, the
    rest after their inter-token gaps (streamed rows); all at t_end when the row has no stream timings."""
    n = int(row.get("output_tokens", 0))
    if row.get("ttft_s") is None or not n:
        return [row["t_end"]] * n
    t = row["t_start"] + row["ttft_s"]
    times = [t]
    for gap in row.get("itl_s", [])[: n - 1]:
        t += gap
        times.append(t)
    times += [row.get("t_end", t)] * (n - len(times))  # tokens the final usage counts beyond the stream
    return times


def throughput_series(rows: list[dict[str, Any]], bin_s: float = 1.0) -> list[dict[str, float]]:
    """Per bin from the first arrival: requests started, requests finished, and output tokens counted when
    they streamed in (not all at their request's end, which would show bursts that never happened)."""
    if not rows:
        return []
    t0, t1 = _wall(rows)
    n = int((t1 - t0) // bin_s) + 1
    series = [{"t_s": i * bin_s, "started": 0.0, "finished": 0.0, "tokens": 0.0} for i in range(n)]
    for r in rows:
        series[int((r["t_start"] - t0) // bin_s)]["started"] += 1
        if r.get("status") == "OK":
            series[int((r["t_end"] - t0) // bin_s)]["finished"] += 1
            for t in token_times(r):
                series[min(n - 1, max(0, int((t - t0) // bin_s)))]["tokens"] += 1
    return series


def ttft_vs_load(rows: list[dict[str, Any]], window_s: float = 5.0) -> list[dict[str, float | None]]:
    """Per window: arrivals/s, output tokens/s, mean and p90 TTFT of the requests that arrived in it."""
    if not rows:
        return []
    t0, _ = _wall(rows)
    bins: dict[int, list[dict[str, Any]]] = defaultdict(list)
    for r in rows:
        bins[int((r["t_start"] - t0) // window_s)].append(r)
    out = []
    for k in sorted(bins):
        rs = bins[k]
        ttfts = quantiles([r["ttft_s"] for r in rs if r.get("ttft_s") is not None])
        out.append(
            {
                "t_s": k * window_s,
                "rate_rps": len(rs) / window_s,
                "tokens_per_s": sum(r["output_tokens"] for r in rs) / window_s,
                "ttft_mean_s": ttfts["mean"],
                "ttft_p90_s": ttfts["p90"],
                "errors": float(sum(r.get("status") != "OK" for r in rs)),
            }
        )
    return out


def _request_energy(row: dict[str, Any], joined: dict[str, ServerSpan]) -> tuple[float, str, str] | None:
    """(joules, energy source, where the figure came from) for one OK row: the final message's
    usage.energy_joules, else the energy the server's span attributed to it (a server that does not fill
    the usage field yet); None when neither has one."""
    if row.get("usage_energy_j") is not None:
        return (
            float(row["usage_energy_j"]),
            row.get("usage_energy_source") or "unknown",
            "usage.energy_joules",
        )
    span = joined.get(row["rid"])
    if span is not None and span.energy_j is not None:
        return span.energy_j, span.energy_source, "server spans"
    return None


def per_objective(
    rows: list[dict[str, Any]], joined: dict[str, ServerSpan] | None = None, key: str = "objective"
) -> dict[str, dict[str, Any]]:
    """Per objective the requests stated (`key` "model": per base model they named; rows without one
    are left out): requests, TTFT/TPOT/E2E
    quantiles, J/token = Σ per-request energy / Σ output tokens of the OK requests that carry an energy
    figure (`energy_coverage` says which share did), budget met among the OK requests whose reply says
    (requests refused for their budget count under `errors`), and the share of OK requests each variant
    served ("(unnamed)" where the server named none)."""
    joined = joined or {}
    out: dict[str, dict[str, Any]] = {}
    for name in sorted({str(r[key]) for r in rows if r.get(key)}):
        sent = [r for r in rows if r.get(key) == name]
        ok = [r for r in sent if r.get("status") == "OK"]
        errors: dict[str, int] = defaultdict(int)
        for r in sent:
            if r.get("status") != "OK":
                errors[r["status"]] += 1
        energy_j, metered_tokens, metered = 0.0, 0, 0
        sources: set[str] = set()
        origins: set[str] = set()
        for r in ok:
            figure = _request_energy(r, joined)
            if figure is not None:
                energy_j += figure[0]
                metered_tokens += r["output_tokens"]
                metered += 1
                sources.add(figure[1])
                origins.add(figure[2])
        variants: dict[str, int] = defaultdict(int)
        for r in ok:
            variants[r.get("variant") or "(unnamed)"] += 1
        judged = [r for r in ok if r.get("budget_met") is not None]
        met = sum(bool(r["budget_met"]) for r in judged)
        out[name] = {
            "requests": len(sent),
            "ok": len(ok),
            "errors": dict(errors),
            "output_tokens": sum(r["output_tokens"] for r in ok),
            "ttft_s": quantiles([r["ttft_s"] for r in ok if r.get("ttft_s") is not None]),
            "tpot_s": quantiles([r["tpot_s"] for r in ok if r.get("tpot_s") is not None]),
            "e2e_s": quantiles([r["e2e_s"] for r in ok]),
            "energy_j": energy_j if metered else None,
            "j_per_token": energy_j / metered_tokens if metered_tokens else None,
            "energy_source": "+".join(sorted(sources)) or None,
            "energy_from": "+".join(sorted(origins)) or None,
            "energy_coverage": metered / len(ok) if ok else None,
            "budget_judged": len(judged),
            "budget_met": met,
            "budget_met_share": met / len(judged) if judged else None,
            "variants": {v: n / len(ok) for v, n in sorted(variants.items(), key=lambda kv: (-kv[1], kv[0]))},
        }
    return out


def build(
    rows: list[dict[str, Any]],
    *,
    locust: dict[str, dict[str, float | None]] | None = None,
    spans: list[ServerSpan] | None = None,
    server: dict[str, Any] | None = None,
    resources: dict[str, Any] | None = None,
    slo: Slo | None = None,
    meta: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The whole report as a dict (JSON-ready)."""
    if not rows:
        raise ValueError("no requests were recorded: the campaign sent nothing (is the server up?)")
    ok = [r for r in rows if r.get("status") == "OK"]
    errors: dict[str, int] = defaultdict(int)
    for r in rows:
        if r.get("status") != "OK":
            errors[r["status"]] += 1
    t0, t1 = _wall(rows)
    wall = t1 - t0
    tokens = sum(r["output_tokens"] for r in ok)
    sum_lat = sum(r["e2e_s"] for r in ok)
    slo = slo or Slo()
    good = [r for r in ok if slo.met(r)]
    itl = [x for r in ok for x in r.get("itl_s", [])]

    joined = join(rows, spans or [])
    server_cmp: dict[str, Any] = {"spans": len(spans or []), "joined": len(joined)}
    pairs = [
        (r["ttft_s"], joined[r["rid"]].ttft_s)
        for r in ok
        if r["rid"] in joined and r.get("ttft_s") is not None and joined[r["rid"]].ttft_s is not None
    ]
    if not pairs:  # before server spans exist, the stream's final message carries the server's TTFT
        pairs = [
            (r["ttft_s"], r["server_ttft_s"])
            for r in ok
            if r.get("ttft_s") is not None and r.get("server_ttft_s") is not None
        ]
        server_cmp["ttft_source"] = "stream final timings"
    else:
        server_cmp["ttft_source"] = "server spans"
    server_cmp["ttft_pairs"] = len(pairs)
    server_cmp["client_ttft_ge_server"] = sum(c >= s for c, s in pairs)
    server_cmp["ttft_overhead_mean_s"] = (sum(c - s for c, s in pairs) / len(pairs)) if pairs else None

    per_adapter: dict[str, dict[str, Any]] = {}
    for name in sorted({r["adapter"] for r in rows}):
        rs = [r for r in ok if r["adapter"] == name]
        toks = sum(r["output_tokens"] for r in rs)
        sp = [joined[r["rid"]] for r in rs if r["rid"] in joined]
        ej = [s.energy_j for s in sp if s.energy_j is not None]
        per_adapter[name or "(base)"] = {
            "requests": sum(r["adapter"] == name for r in rows),
            "ok": len(rs),
            "output_tokens": toks,
            "ttft_mean_s": quantiles([r["ttft_s"] for r in rs if r.get("ttft_s") is not None])["mean"],
            "e2e_mean_s": quantiles([r["e2e_s"] for r in rs])["mean"],
            "energy_j": sum(ej) if ej else None,
            "j_per_token": (sum(ej) / toks) if ej and toks else None,
            "energy_source": sp[0].energy_source if ej else None,
        }

    span_energy = [s.energy_j for s in joined.values() if s.energy_j is not None]
    energy_j: float | None
    source: str | None
    res = resources or {}
    # The campaign's energy is the whole window's (idle share included), as J/token in a steady-state
    # window is defined; the per-request energy the server attributes in its spans is given beside it.
    if res.get("energy_j") is not None:
        energy_j, source = res["energy_j"], res.get("energy_source")
    elif span_energy:
        energy_j, source = sum(span_energy), next(iter(joined.values())).energy_source + " (server spans)"
    else:
        energy_j, source = None, None
    aec = (
        res.get("aec_w")
        if res.get("aec_w") is not None
        else (energy_j / wall if energy_j is not None and wall > 0 else None)
    )
    objectives = per_objective(rows, joined)  # empty unless the requests stated objectives
    models = per_objective(rows, joined, "model")  # empty unless the requests named models
    srv = server or {}
    info = srv.get("model_info", {})
    return {
        "meta": meta or {},
        "requests": {
            "total": len(rows),
            "ok": len(ok),
            "errors": dict(errors),
            "server_requests_delta": srv.get("requests_total_delta"),
            "server_output_tokens_delta": srv.get("output_tokens_total_delta"),
        },
        "wall_s": wall,
        "output_tokens": tokens,
        "input_tokens": sum(r.get("input_tokens", 0) for r in ok),
        "throughput": {
            "tokens_per_s_wall": metrics.wall_throughput(tokens, wall) if wall > 0 else None,
            "it_tokens_per_s": tokens / sum_lat if sum_lat > 0 else None,
            "requests_per_s": len(ok) / wall if wall > 0 else None,
        },
        "latency_s": {
            "ttft": quantiles([r["ttft_s"] for r in ok if r.get("ttft_s") is not None]),
            "tpot": quantiles([r["tpot_s"] for r in ok if r.get("tpot_s") is not None]),
            "itl": quantiles(itl),
            "e2e": quantiles([r["e2e_s"] for r in ok]),
        },
        "goodput": {
            "slo": {"ttft_s": slo.ttft_s, "tpot_s": slo.tpot_s, "e2e_s": slo.e2e_s},
            "requests": len(good),
            "share": len(good) / len(rows),
            "requests_per_s": len(good) / wall if wall > 0 else None,
        },
        "per_adapter": per_adapter,
        **({"per_objective": objectives} if objectives else {}),
        **({"per_model": models} if models else {}),
        "server": server_cmp,
        "efficientllm": {
            "amu_gb": res.get("amu_gb"),
            "amu_ratio": res.get("amu"),
            "pcu": res.get("pcu"),
            "resources_from": res.get("source", "load-side process watch" if res else None),
            "al_s": metrics.average_latency([r["e2e_s"] for r in ok]) if ok else None,
            "at_it_tokens_per_s": metrics.inference_throughput(
                [r["output_tokens"] for r in ok], [r["e2e_s"] for r in ok]
            )
            if sum_lat > 0
            else None,
            "aec_w": aec,
            "energy_j": energy_j,
            "energy_source": source,
            "j_per_token": metrics.joules_per_token(energy_j, tokens)
            if energy_j is not None and tokens
            else None,
            "attributed_energy_j": sum(span_energy) if span_energy else None,
            "precision": info.get("precision"),
            "engine": info.get("engine"),
            "weight_bytes": info.get("weight_bytes"),
        },
        "locust": locust or {},
        "series": {"throughput_1s": throughput_series(rows), "ttft_vs_load": ttft_vs_load(rows)},
        "cdf_s": {
            k: sorted(v)
            for k, v in {
                "ttft": [r["ttft_s"] for r in ok if r.get("ttft_s") is not None],
                "tpot": [r["tpot_s"] for r in ok if r.get("tpot_s") is not None],
                "e2e": [r["e2e_s"] for r in ok],
            }.items()
        },
    }
