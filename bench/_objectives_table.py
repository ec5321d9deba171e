"""bench/objectives.py's comparison: the refusal rule, per-objective table, ratios and the issue's targets.

Pure functions over plain dicts (stdlib and effllm.common only; unit-tested in
tests/bench/test_objectives.py). One "server" is one campaign's results: its per-request rows (loadtest
rows: stream, index, objective, max_new_tokens, status, input_tokens, output_tokens), its report's
`per_objective` table, the variants its GetModelInfo lists (name, perplexity, quality) and, for a
single-variant server, `variant`: the one it serves.

Quality of a variant = the lowest perplexity measured for any variant / its own (VariantInfo.perplexity,
each scored by a server on that variant's own kernels at start-up; the mixed server's figure wins where
several servers measured one); an objective's quality = Σ over variants of (share of its requests
served there) × quality. Targets (issue 14): ENERGY J/token ≤ 0.7 × the reference single-variant
server's on the same requests; LATENCY TTFT p50 ≤ 1.1 × the fastest single-variant server's; QUALITY: every
QUALITY request on a best-quality variant (one within common/heldout.QUALITY_RESOLUTION of the best:
the held-out set cannot rank fp32 and bf16) (judged only without a budget: with one, the client cannot
tell whether the best variant met it).

Invariant: no ratio and no verdict unless every server answered the same requests (same stream and
index, objective, prompt tokens) and decoded exactly the same tokens (check_same_requests).
"""

from __future__ import annotations

from typing import Any

from effllm.common.heldout import equally_good

MIXED = "mixed"
ENERGY_BOUND = 0.7  # × the reference server's J/token
LATENCY_BOUND = 1.1  # × the fastest single-variant server's TTFT p50


def check_same_requests(rows_by_server: dict[str, list[dict[str, Any]]]) -> str | None:
    """Why the servers cannot be compared, or None: each must have answered every request OK, decoded
    exactly its max_new_tokens, and seen the same (stream, index) -> objective and token counts."""
    ref_label = ""
    ref: dict[tuple[int, int], tuple[Any, ...]] | None = None
    for label, rows in rows_by_server.items():
        if not rows:
            return f"{label}: no request was recorded"
        failed = sorted({str(r.get("status")) for r in rows if r.get("status") != "OK"})
        if failed:
            n = sum(r.get("status") != "OK" for r in rows)
            return f"{label}: {n} of {len(rows)} requests failed ({', '.join(failed)})"
        short = [r for r in rows if r["output_tokens"] != r["max_new_tokens"]]
        if short:
            r = short[0]
            return (
                f"{label}: {len(short)} requests decoded other than their max_new_tokens (e.g. "
                f"{r['output_tokens']} of {r['max_new_tokens']}): run with ignore_eos"
            )
        keys = {
            (int(r["stream"]), int(r["index"])): (
                r.get("objective"),
                r["max_new_tokens"],
                r.get("input_tokens"),
                r["output_tokens"],
            )
            for r in rows
        }
        if len(keys) != len(rows):
            return f"{label}: a request (stream, index) was recorded twice"
        if ref is None:
            ref_label, ref = label, keys
            continue
        if keys.keys() != ref.keys():
            return f"{label} sent {len(keys)} requests, {ref_label} {len(ref)}: not the same arrivals"
        for key in sorted(keys):
            if keys[key] != ref[key]:
                return (
                    f"request {key}: (objective, max_new_tokens, input_tokens, output_tokens) = "
                    f"{keys[key]} on {label}, {ref[key]} on {ref_label}"
                )
    return None


def quality_map(servers: dict[str, dict[str, Any]]) -> dict[str, float]:
    """Variant name -> quality (best perplexity / its perplexity) from the servers' VariantInfo."""
    ppl: dict[str, float] = {}
    for label in sorted(servers, key=lambda s: s != MIXED):  # the mixed server's figures first
        for v in servers[label].get("variants", []):
            if v.get("perplexity") and v["name"] not in ppl:  # 0: not measured (proto default)
                ppl[v["name"]] = float(v["perplexity"])
    best = min(ppl.values(), default=None)
    return {name: best / p for name, p in ppl.items()} if best else {}


def served_shares(server: dict[str, Any], objective: dict[str, Any]) -> dict[str, float]:
    """Variant -> share of the objective's requests; a single-variant server that names no variant in its
    replies (an older server) served them all on the variant it was started with."""
    shares: dict[str, float] = dict(objective.get("variants", {}))
    if server.get("variant") and "(unnamed)" in shares:
        shares[server["variant"]] = shares.get(server["variant"], 0.0) + shares.pop("(unnamed)")
    return shares


def objective_quality(shares: dict[str, float], quality: dict[str, float]) -> float | None:
    if not shares or any(name not in quality for name, s in shares.items() if s > 0):
        return None
    return sum(s * quality[name] for name, s in shares.items() if s > 0)


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def compare(servers: dict[str, dict[str, Any]], reference: str, budget: bool) -> dict[str, Any]:
    """Per server and objective: requests, J/token, TTFT p50/p99, quality, variant shares; the mixed
    server's ratios to each single-variant server; the targets. `reference`: the single-variant server
    whose J/token the ENERGY target is measured against; `budget`: the requests carried one."""
    quality = quality_map(servers)
    singles = [s for s in servers if s != MIXED]
    rows: list[dict[str, Any]] = []
    cell: dict[tuple[str, str], dict[str, Any]] = {}
    for label, server in servers.items():
        for name, o in server["per_objective"].items():
            shares = served_shares(server, o)
            row = {
                "server": label,
                "objective": name,
                "requests": o["requests"],
                "j_per_token": o["j_per_token"],
                "energy_source": o.get("energy_source"),
                "energy_from": o.get("energy_from"),  # usage.energy_joules, or server spans (older)
                "ttft_p50_s": o["ttft_s"]["p50"],
                "ttft_p99_s": o["ttft_s"]["p99"],
                "quality": objective_quality(shares, quality),
                "variants": shares,
            }
            rows.append(row)
            cell[(label, name)] = row
    for row in rows:
        if row["server"] != MIXED:
            continue
        row["vs"] = {}
        for s in singles:  # the same requests (same objective) on that single-variant server
            other = cell.get((s, row["objective"]), {})
            row["vs"][s] = {
                "j_per_token": _ratio(row["j_per_token"], other.get("j_per_token")),
                "ttft_p50": _ratio(row["ttft_p50_s"], other.get("ttft_p50_s")),
            }
    top = max(quality.values(), default=None)
    best = sorted(n for n, q in quality.items() if equally_good(q, top)) if top is not None else []
    return {
        "quality": quality,
        "best_variants": best,
        "reference": reference,
        "rows": rows,
        "targets": {
            "energy": _energy_target(cell, reference),
            "latency": _latency_target(cell, singles),
            "quality": _quality_target(cell, best, budget),
        },
    }


def _verdict(ok: bool, **kw: Any) -> dict[str, Any]:
    return {"verdict": "PASS" if ok else "MISS", **kw}


def _na(why: str) -> dict[str, Any]:
    return {"verdict": "n/a", "why": why}


def _energy_target(cell: dict[tuple[str, str], dict[str, Any]], reference: str) -> dict[str, Any]:
    mixed, ref = cell.get((MIXED, "energy")), cell.get((reference, "energy"))
    if mixed is None or ref is None:
        return _na(f"needs ENERGY requests on the mixed and the {reference} server")
    if mixed["j_per_token"] is None or not ref["j_per_token"]:
        return _na("a server reported no per-request energy")
    ratio = mixed["j_per_token"] / ref["j_per_token"]
    return _verdict(ratio <= ENERGY_BOUND, ratio=ratio, bound=ENERGY_BOUND, against=reference)


def _latency_target(cell: dict[tuple[str, str], dict[str, Any]], singles: list[str]) -> dict[str, Any]:
    mixed = cell.get((MIXED, "latency"))
    single = {s: cell[(s, "latency")]["ttft_p50_s"] for s in singles if (s, "latency") in cell}
    single = {s: v for s, v in single.items() if v}
    if mixed is None or mixed["ttft_p50_s"] is None or not single:
        return _na("needs LATENCY requests (streamed) on the mixed and a single-variant server")
    fastest = min(single, key=lambda s: single[s])
    ratio = mixed["ttft_p50_s"] / single[fastest]
    return _verdict(ratio <= LATENCY_BOUND, ratio=ratio, bound=LATENCY_BOUND, against=fastest)


def _quality_target(
    cell: dict[tuple[str, str], dict[str, Any]], best: list[str], budget: bool
) -> dict[str, Any]:
    mixed = cell.get((MIXED, "quality"))
    if mixed is None:
        return _na("needs QUALITY requests on the mixed server")
    if not best:
        return _na("no server reported its variants' perplexity")
    if budget:
        return _na("requests carried a budget: the client cannot tell whether the best variant met it")
    share = sum(mixed["variants"].get(name, 0.0) for name in best)
    return _verdict(share >= 1.0 - 1e-9, share_on_best=share, best=", ".join(best))


def _f(x: float | None, scale: float = 1.0, digits: int = 3) -> str:
    return "—" if x is None else f"{x * scale:.{digits}g}"


def format_markdown(result: dict[str, Any]) -> str:
    singles = sorted({s for r in result["rows"] if r["server"] == MIXED for s in r["vs"]})
    head = ["server", "objective", "requests", "J/token", "TTFT p50 (ms)", "TTFT p99 (ms)", "quality"]
    head += ["variants", *(f"J/tok ÷ {s}" for s in singles), *(f"TTFT p50 ÷ {s}" for s in singles)]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in result["rows"]:
        vs = r.get("vs", {})
        cells = [
            r["server"],
            r["objective"],
            str(r["requests"]),
            _f(r["j_per_token"]),
            _f(r["ttft_p50_s"], 1e3, 4),
            _f(r["ttft_p99_s"], 1e3, 4),
            _f(r["quality"], digits=4),
            ", ".join(f"{n} {s * 100:.0f} %" for n, s in r["variants"].items()) or "—",
            *(_f(vs.get(s, {}).get("j_per_token")) for s in singles),
            *(_f(vs.get(s, {}).get("ttft_p50")) for s in singles),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    sources = sorted({r["energy_source"] for r in result["rows"] if r.get("energy_source")})
    origins = sorted({r["energy_from"] for r in result["rows"] if r.get("energy_from")})
    lines += [
        "",
        f"J/token: Σ per-request energy / Σ output tokens, from {', '.join(origins) or '—'}; "
        f"energy source: {', '.join(sources) or '—'}.",
    ]
    t = result["targets"]
    lines += [
        "",
        f"- ENERGY J/token ≤ {ENERGY_BOUND}× the {result['reference']} server: {_target_text(t['energy'])}",
        f"- LATENCY TTFT p50 ≤ {LATENCY_BOUND}× the fastest single-variant server: "
        f"{_target_text(t['latency'])}",
        f"- QUALITY on the best-quality variant ({', '.join(result['best_variants']) or '?'}) 100 %: "
        f"{_target_text(t['quality'])}",
    ]
    return "\n".join(lines)


def _target_text(t: dict[str, Any]) -> str:
    if t["verdict"] == "n/a":
        return f"n/a ({t['why']})"
    if "ratio" in t:
        return f"{t['verdict']} ({t['ratio']:.3g}× {t['against']})"
    return f"{t['verdict']} ({t['share_on_best'] * 100:.0f} % on {t['best']})"
