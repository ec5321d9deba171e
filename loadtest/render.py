"""Render reports as Markdown and as one self-contained HTML page (figures embedded as base64 PNGs).

Takes one or more report dicts (loadtest/report.py) keyed by label (one campaign, or one per precision)
and an optional precision table (loadtest/precision.py). No network, no external assets: the page opens
from a file anywhere.
"""

from __future__ import annotations

import base64
import html
from typing import Any

from . import plots


def _f(x: Any, scale: float = 1.0, digits: int = 3) -> str:
    if x is None:
        return "—"
    if isinstance(x, (int, float)):
        return f"{x * scale:.{digits}g}" if isinstance(x, float) else str(x)
    return str(x)


def summary_rows(label: str, rep: dict[str, Any]) -> list[list[str]]:
    lat, thr, req, good = rep["latency_s"], rep["throughput"], rep["requests"], rep["goodput"]
    errs = ", ".join(f"{k}={v}" for k, v in req["errors"].items()) or "none"
    return [
        ["campaign", label],
        ["requests (ok / total)", f"{req['ok']} / {req['total']}"],
        ["errors", errs],
        ["server requests (GetStats delta)", _f(req.get("server_requests_delta"))],
        ["server spans joined", f"{rep['server']['joined']} of {rep['server']['spans']}"],
        ["wall time (s)", _f(rep["wall_s"], digits=4)],
        ["output tokens", _f(rep["output_tokens"])],
        ["tokens/s (tokens / wall)", _f(thr["tokens_per_s_wall"], digits=4)],
        ["IT tokens/s (Σ tokens / Σ latency)", _f(thr["it_tokens_per_s"], digits=4)],
        ["requests/s", _f(thr["requests_per_s"], digits=4)],
        [
            "TTFT mean / p50 / p90 / p99 (ms)",
            " / ".join(_f(lat["ttft"][k], 1e3, 4) for k in ("mean", "p50", "p90", "p99")),
        ],
        [
            "TPOT mean / p50 / p90 / p99 (ms)",
            " / ".join(_f(lat["tpot"][k], 1e3, 4) for k in ("mean", "p50", "p90", "p99")),
        ],
        ["ITL mean / p50 / p99 (ms)", " / ".join(_f(lat["itl"][k], 1e3, 4) for k in ("mean", "p50", "p99"))],
        [
            "E2E mean / p50 / p90 / p99 (s)",
            " / ".join(_f(lat["e2e"][k], digits=4) for k in ("mean", "p50", "p90", "p99")),
        ],
        [
            "client TTFT ≥ server TTFT",
            f"{rep['server']['client_ttft_ge_server']} of {rep['server']['ttft_pairs']}"
            f" ({rep['server']['ttft_source']})",
        ],
        [
            "goodput (SLO " + ", ".join(f"{k}≤{v}" for k, v in good["slo"].items() if v is not None) + ")",
            f"{good['requests']} req ({good['share'] * 100:.1f} %), "
            f"{_f(good['requests_per_s'], digits=4)} req/s",
        ],
    ]


EFF_COLUMNS = (
    "precision",
    "AMU (GB)",
    "AMU (ratio)",
    "PCU",
    "AL (s)",
    "AT (IT tok/s)",
    "AEC (W)",
    "energy source",
    "J/token",
)


def eff_row(label: str, rep: dict[str, Any]) -> list[str]:
    e = rep["efficientllm"]
    return [
        e.get("precision") or label,
        _f(e["amu_gb"]),
        _f(e.get("amu_ratio")),
        _f(e["pcu"]),
        _f(e["al_s"], digits=4),
        _f(e["at_it_tokens_per_s"], digits=4),
        _f(e["aec_w"]),
        _f(e["energy_source"]),
        _f(e["j_per_token"]),
    ]


def adapter_rows(rep: dict[str, Any]) -> list[list[str]]:
    return [
        [
            name,
            str(a["requests"]),
            str(a["ok"]),
            str(a["output_tokens"]),
            _f(a["ttft_mean_s"], 1e3, 4),
            _f(a["e2e_mean_s"], digits=4),
            _f(a["j_per_token"]),
            _f(a["energy_source"]),
        ]
        for name, a in rep["per_adapter"].items()
    ]


ADAPTER_COLUMNS = (
    "adapter",
    "requests",
    "ok",
    "tokens",
    "TTFT mean (ms)",
    "E2E mean (s)",
    "J/token",
    "source",
)


OBJECTIVE_COLUMNS = (
    "objective",
    "ok / requests",
    "TTFT p50 / p99 (ms)",
    "TPOT p50 / p99 (ms)",
    "E2E p50 / p99 (s)",
    "J/token",
    "energy source",
    "budget met",
    "variants",
)


def variant_shares(shares: dict[str, float]) -> str:
    """{"int4:hf": 0.8, "fp32:hf": 0.2} -> "int4:hf 80 %, fp32:hf 20 %"."""
    return ", ".join(f"{name} {share * 100:.0f} %" for name, share in shares.items()) or "—"


def objective_rows(per_objective: dict[str, dict[str, Any]]) -> list[list[str]]:
    rows = []
    for name, o in per_objective.items():
        budget = (
            f"{o['budget_met']} of {o['budget_judged']} ({o['budget_met_share'] * 100:.0f} %)"
            if o["budget_judged"]
            else "—"
        )
        source = "—"
        if o["energy_source"]:
            source = f"{o['energy_source']} ({o['energy_from']}"
            if o["energy_coverage"] is not None and o["energy_coverage"] < 1:
                source += f", {o['energy_coverage'] * 100:.0f} % of requests"
            source += ")"
        errors = ", ".join(f"{k}={v}" for k, v in o["errors"].items())
        rows.append(
            [
                name,
                f"{o['ok']} / {o['requests']}" + (f" ({errors})" if errors else ""),
                " / ".join(_f(o["ttft_s"][k], 1e3, 4) for k in ("p50", "p99")),
                " / ".join(_f(o["tpot_s"][k], 1e3, 4) for k in ("p50", "p99")),
                " / ".join(_f(o["e2e_s"][k], digits=4) for k in ("p50", "p99")),
                _f(o["j_per_token"]),
                source,
                budget,
                variant_shares(o["variants"]),
            ]
        )
    return rows


def objective_table_md(per_objective: dict[str, dict[str, Any]], key: str = "objective") -> str:
    """The per-objective table, or with `key` "model" the per-model one (the same columns)."""
    return _md_table((key, *OBJECTIVE_COLUMNS[1:]), objective_rows(per_objective))


def _md_table(head: tuple[str, ...] | list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def markdown(reports: dict[str, dict[str, Any]], precision: dict[str, Any] | None = None) -> str:
    out = ["# effllm load campaign", ""]
    for label, rep in reports.items():
        out += [
            f"## {label}",
            "",
            _md_table(["figure", "value"], summary_rows(label, rep)),
            "",
            "### Per adapter",
            "",
            _md_table(ADAPTER_COLUMNS, adapter_rows(rep)),
            "",
        ]
        if rep.get("per_objective"):
            out += ["### Per objective", "", objective_table_md(rep["per_objective"]), ""]
        if rep.get("per_model"):
            out += ["### Per model", "", objective_table_md(rep["per_model"], "model"), ""]
    out += [
        "## EfficientLLM metrics",
        "",
        _md_table(EFF_COLUMNS, [eff_row(k, r) for k, r in reports.items()]),
        "",
    ]
    if precision:
        out += [
            "## Precision table (EfficientLLM §5.5 style)",
            "",
            _md_table(precision["columns"], precision["rows"]),
            "",
            precision.get("note", ""),
            "",
        ]
    return "\n".join(out)


def _html_table(head: tuple[str, ...] | list[str], rows: list[list[str]]) -> str:
    th = "".join(f"<th>{html.escape(h)}</th>" for h in head)
    trs = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table><thead><tr>{th}</tr></thead><tbody>{trs}</tbody></table>"


def _img(png: bytes | None, alt: str) -> str:
    if png is None:
        return f"<p class='na'>{html.escape(alt)}: no data</p>"
    return f"<img alt='{html.escape(alt)}' src='data:image/png;base64,{base64.b64encode(png).decode()}'>"


_CSS = """body{font-family:system-ui,sans-serif;margin:24px;max-width:1250px;color:#222}
table{border-collapse:collapse;margin:8px 0 18px}td,th{border:1px solid #ccc;padding:3px 8px;font-size:13px}
th{background:#f0f0f5;text-align:left}img{max-width:100%;border:1px solid #eee;margin:4px 0}
.na{color:#999}.row{display:flex;gap:12px;flex-wrap:wrap;align-items:flex-start}
h2{border-bottom:2px solid #ddd}"""


def html_page(
    reports: dict[str, dict[str, Any]],
    precision: dict[str, Any] | None = None,
    title: str = "effllm load campaign",
) -> str:
    parts = [
        f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
        f"<style>{_CSS}</style></head><body><h1>{html.escape(title)}</h1>"
    ]
    parts.append(
        "<h2>EfficientLLM metrics</h2>"
        + _html_table(EFF_COLUMNS, [eff_row(k, r) for k, r in reports.items()])
    )
    if precision:
        parts.append(
            "<h2>Precision table (EfficientLLM §5.5 style)</h2>"
            + _html_table(precision["columns"], precision["rows"])
            + f"<p>{html.escape(precision.get('note', ''))}</p>"
        )
    parts.append(
        "<div class='row'>"
        + _img(plots.ttft_vs_load(reports), "TTFT vs load")
        + _img(plots.j_per_token(reports), "J per token")
        + "</div>"
    )
    for label, rep in reports.items():
        parts.append(
            f"<h2>{html.escape(label)}</h2><div class='row'>"
            + _html_table(["figure", "value"], summary_rows(label, rep))
            + _html_table(ADAPTER_COLUMNS, adapter_rows(rep))
            + "</div>"
        )
        if rep.get("per_objective"):
            parts.append(
                "<h3>Per objective</h3>"
                + _html_table(OBJECTIVE_COLUMNS, objective_rows(rep["per_objective"]))
            )
        if rep.get("per_model"):
            parts.append(
                "<h3>Per model</h3>"
                + _html_table(("model", *OBJECTIVE_COLUMNS[1:]), objective_rows(rep["per_model"]))
            )
        parts.append(
            _img(plots.latency_cdfs(rep), "latency CDFs")
            + _img(plots.throughput_over_time(rep), "throughput")
        )
        if rep.get("locust"):
            rows = [[name, *(_f(v) for v in s.values())] for name, s in rep["locust"].items()]
            head = ["Locust name", *next(iter(rep["locust"].values())).keys()]
            parts.append("<h3>Locust's own stats</h3>" + _html_table(head, rows))
    parts.append("</body></html>")
    return "\n".join(parts)
