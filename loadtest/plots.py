"""The report's figures as PNG bytes (matplotlib, Agg backend: no display needed).

Each function takes report dicts (loadtest/report.py) and returns PNG bytes, or None when the data for
that figure is absent, so the HTML page simply leaves the figure out.
"""

from __future__ import annotations

import io
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt


def _png(fig: Any) -> bytes:
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png", dpi=90)
    plt.close(fig)
    return buf.getvalue()


def latency_cdfs(report: dict[str, Any]) -> bytes | None:
    cdf = report.get("cdf_s", {})
    if not any(cdf.values()):
        return None
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.4))
    for ax, key in zip(axes, ("ttft", "tpot", "e2e"), strict=True):
        xs = cdf.get(key) or []
        if xs:
            ax.plot(
                [x * 1e3 for x in xs], [(i + 1) / len(xs) for i in range(len(xs))], drawstyle="steps-post"
            )
        ax.set_title(f"{key.upper()} CDF (n={len(xs)})")
        ax.set_xlabel("ms")
        ax.set_ylabel("fraction of requests")
        ax.grid(alpha=0.3)
    return _png(fig)


def throughput_over_time(report: dict[str, Any]) -> bytes | None:
    s = report.get("series", {}).get("throughput_1s") or []
    if not s:
        return None
    fig, ax = plt.subplots(figsize=(12, 3.2))
    t = [b["t_s"] for b in s]
    ax.bar(
        t,
        [b["tokens"] for b in s],
        width=0.9,
        align="edge",
        color="tab:blue",
        alpha=0.35,
        label="output tokens/s (bars)",
    )
    ax.set_xlabel("s since first request")
    ax.set_ylabel("tokens/s")
    ax2 = ax.twinx()
    ax2.plot(t, [b["started"] for b in s], color="tab:orange", alpha=0.7, label="arrivals/s")
    ax2.plot(t, [b["finished"] for b in s], color="tab:green", alpha=0.7, label="completions/s")
    ax2.set_ylabel("requests/s")
    ax.set_title("Throughput over time (1 s bins)")
    fig.legend(loc="upper right")
    ax.grid(alpha=0.3)
    return _png(fig)


def ttft_vs_load(reports: dict[str, dict[str, Any]]) -> bytes | None:
    """TTFT against offered rate, one line per report (e.g. one per precision), from 5 s windows."""
    if not any(r.get("series", {}).get("ttft_vs_load") for r in reports.values()):
        return None
    fig, ax = plt.subplots(figsize=(6, 3.6))
    for label, rep in reports.items():
        w = [x for x in rep["series"]["ttft_vs_load"] if x["ttft_mean_s"] is not None]
        w.sort(key=lambda x: x["rate_rps"])
        ax.plot([x["rate_rps"] for x in w], [x["ttft_mean_s"] * 1e3 for x in w], "o-", label=f"{label} mean")
        ax.plot(
            [x["rate_rps"] for x in w],
            [x["ttft_p90_s"] * 1e3 for x in w],
            "x--",
            alpha=0.6,
            label=f"{label} p90",
        )
    ax.set_xlabel("arrivals/s in the window")
    ax.set_ylabel("TTFT (ms)")
    ax.set_title("TTFT vs load (5 s windows)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return _png(fig)


def j_per_token(reports: dict[str, dict[str, Any]]) -> bytes | None:
    """J/token per adapter (from server spans) or per report (whole campaign) as bars, source in the title."""
    bars: list[tuple[str, float]] = []
    sources: set[str] = set()
    for label, rep in reports.items():
        per = {k: v for k, v in rep.get("per_adapter", {}).items() if v.get("j_per_token") is not None}
        if per:
            bars += [(f"{label}:{k}" if len(reports) > 1 else k, v["j_per_token"]) for k, v in per.items()]
            sources |= {str(v["energy_source"]) for v in per.values()}
        elif rep.get("efficientllm", {}).get("j_per_token") is not None:
            bars.append((label, rep["efficientllm"]["j_per_token"]))
            sources.add(str(rep["efficientllm"]["energy_source"]))
    if not bars:
        return None
    fig, ax = plt.subplots(figsize=(6, 3.6))
    ax.bar([b[0] for b in bars], [b[1] for b in bars], color="tab:purple")
    ax.set_ylabel("J / output token")
    ax.set_title("Energy per token — " + ", ".join(sorted(sources)), fontsize=8)
    ax.tick_params(axis="x", rotation=45, labelsize=7)
    ax.grid(alpha=0.3, axis="y")
    return _png(fig)
