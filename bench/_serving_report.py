"""bench/serving.py's report: the refusal rule, ratios and tables. Pure functions, no engine (unit-tested).

A "cell" is one side at one precision and concurrency: its `runs` (one per repeat), each with the tokens
every request decoded (`per_request`), the seconds it took and CPU ms per token by process.

Invariant: build_rows reports a row only if check_row found every request of every run on every side
decoded exactly max_new tokens.
"""

from __future__ import annotations

import statistics
from typing import Any

LABELS = {
    "vllm-offline": "vLLM offline LLM.generate",
    "effllm-vllm": "effllm gRPC, vllm engine",
    "effllm-hf": "effllm gRPC, hf engine",
    "effllm-hf-compiled": "effllm gRPC, hf engine, compiled decode",
    "effllm-auto": "effllm serve with no flags (auto)",
    "hf-generate": "transformers static-batch generate",
}
BASELINE = "vllm-offline"


def n_requests(concurrency: int, per_level: int) -> int:
    return max(per_level, 2 * concurrency)


def check_row(cells: dict[str, dict[str, Any]], max_new: int, requests: int) -> str | None:
    """Why the row must not be reported, or None. Each cell's `per_request` lists the tokens every
    request decoded; all must be exactly `max_new`, with `requests` requests on every side."""
    problems = []
    for side, cell in cells.items():
        counts = cell["per_request"]
        if len(counts) != requests:
            problems.append(f"{side} finished {len(counts)} of {requests} requests")
        wrong = sorted({n for n in counts if n != max_new})
        if wrong:
            problems.append(f"{side} decoded {wrong} tokens per request, not {max_new}")
    totals = {side: sum(cell["per_request"]) for side, cell in cells.items()}
    if len(set(totals.values())) > 1:
        problems.append(f"sides decoded different totals {totals}")
    return "; ".join(problems) or None


def tok_s(cell: dict[str, Any]) -> float:
    """Median over repeats of one cell's tokens/s."""
    return statistics.median(sum(r["per_request"]) / r["seconds"] for r in cell["runs"])


def build_rows(
    results: dict[tuple[str, str], dict[str, Any]], levels: list[int], max_new: int, per_level: int
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """results[(precision, side)]["levels"][str(c)]["runs"] -> (reported rows, refused rows)."""
    rows, refused = [], []
    for precision in dict.fromkeys(p for p, _ in results):
        for c in levels:
            requests = n_requests(c, per_level)
            cells = {side: res["levels"][str(c)] for (p, side), res in results.items() if p == precision}
            flat = {
                side + (f" (repeat {i})" if i else ""): run
                for side, cell in cells.items()
                for i, run in enumerate(cell["runs"])
            }
            why = check_row(flat, max_new, requests)
            row: dict[str, Any] = {"precision": precision, "concurrency": c, "requests": requests}
            if why:
                refused.append({**row, "reason": why})
                continue
            base_p = precision if (precision, BASELINE) in results else "bf16"
            base_res = results.get((base_p, BASELINE))
            base = tok_s(base_res["levels"][str(c)]) if base_res else None
            row["baseline"] = f"{BASELINE} {base_p}" if base else None
            row["tokens_per_request"] = max_new
            row["sides"] = {
                side: {
                    "tok_s": tok_s(cell),
                    "ratio": tok_s(cell) / base if base else None,
                    "ttft_p50_s": cell["runs"][0].get("ttft_p50_s"),
                    "cpu_ms_per_token": cell["runs"][0].get("cpu_ms_per_token", {}),
                    "load_before": cell["runs"][0]["load_before"],
                    "load_after": cell["runs"][-1]["load_after"],
                }
                for side, cell in cells.items()
            }
            rows.append(row)
    return rows, refused


def format_table(rows: list[dict[str, Any]], levels: list[int], max_new: int) -> str:
    """One line per (precision, side): tok/s and the ratio to the baseline at each concurrency."""
    head = "| tok/s | tok/req | " + " | ".join(f"c={c}" for c in levels) + " |"
    lines = [head, "|---|---:|" + "---:|" * len(levels)]
    by_key: dict[tuple[str, str], dict[int, dict[str, Any]]] = {}
    for row in rows:
        for side, cell in row["sides"].items():
            by_key.setdefault((row["precision"], side), {})[row["concurrency"]] = cell
    for (precision, side), cells in by_key.items():
        out = []
        for c in levels:
            cell = cells.get(c)
            if cell is None:
                out.append("refused")
            elif cell["ratio"] is None or side == BASELINE:
                out.append(f"{cell['tok_s']:.1f}")
            else:
                out.append(f"{cell['tok_s']:.1f} ({cell['ratio']:.2f}x)")
        lines.append(f"| {LABELS[side]}, {precision} | {max_new} | " + " | ".join(out) + " |")
    return "\n".join(lines)


def format_cpu(rows: list[dict[str, Any]]) -> str:
    """Where the CPU goes: ms of CPU per decoded token, by process, for every reported cell."""
    roles = ("driver", "server", "vllm-enginecore", "vllm-worker", "other")
    lines = ["| CPU ms/token | c | " + " | ".join(roles) + " | total |", "|---|---:|" + "---:|" * 6]
    for row in rows:
        for side, cell in row["sides"].items():
            cpu = cell["cpu_ms_per_token"]
            cols = " | ".join(f"{cpu[r]:.1f}" if r in cpu else "-" for r in roles)
            name = f"{LABELS[side]}, {row['precision']}"
            lines.append(f"| {name} | {row['concurrency']} | {cols} | {sum(cpu.values()):.1f} |")
    return "\n".join(lines)
