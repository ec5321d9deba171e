"""Precision campaign: the same workload against one server per precision, one after another.

For each precision: start `effllm serve SERVE_ARGS --precision P [extra args for P]`, run the campaign,
stop the server, and score held-out perplexity in a separate process (loadtest/quality.py). The result is
the EfficientLLM §5.5-style table — memory, AL, AT, AEC (with its source), J/token, perplexity and MCR:

    MCR = (weight_bytes_ref / weight_bytes_P) × (quality_P / quality_ref),  quality = 1 / perplexity,

with the reference bf16 when it is in the sweep (the paper's anchor), else the first precision run. A
precision whose server fails to start (e.g. int4 on an engine without it) gets a row that says why.
"""

from __future__ import annotations

import json
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any

from ..telemetry import metrics
from .campaign import Campaign, ServerHandle, run, write
from .config import LoadConfig
from .quality import default_model_path
from .report import Slo
from .workload import Workload

COLUMNS = [
    "precision",
    "engine",
    "weights (MB)",
    "AMU (GB)",
    "AL (s)",
    "AT (IT tok/s)",
    "tok/s (wall)",
    "TTFT p50 (ms)",
    "AEC (W)",
    "J/token",
    "energy source",
    "perplexity",
    "MCR",
    "ok/total",
]


def _model_path(serve_args: str) -> str:
    args = shlex.split(serve_args)
    if "--model" in args:
        return args[args.index("--model") + 1]
    return default_model_path()


def score(model_path: str, precision: str, timeout_s: float = 900.0) -> dict[str, Any]:
    proc = subprocess.run(
        [sys.executable, "-m", "effllm.loadtest.quality", model_path, precision],
        capture_output=True,
        text=True,
        timeout=timeout_s,
    )
    if proc.returncode != 0:
        return {
            "error": proc.stderr.strip().splitlines()[-1]
            if proc.stderr.strip()
            else f"exit {proc.returncode}"
        }
    return dict(json.loads(proc.stdout.strip().splitlines()[-1]))


def table(
    reports: dict[str, dict[str, Any]], quality: dict[str, dict[str, Any]], failed: dict[str, str]
) -> dict[str, Any]:
    ran = [p for p in reports if reports[p]["efficientllm"].get("weight_bytes")]
    ref = "bf16" if "bf16" in ran else (ran[0] if ran else None)
    rows: list[list[str]] = []
    records: list[dict[str, Any]] = []

    def ppl(p: str) -> float | None:
        v = quality.get(p, {}).get("perplexity")
        return float(v) if v is not None else None

    for p, rep in reports.items():
        e = rep["efficientllm"]
        mcr = None
        if ref and e.get("weight_bytes") and ppl(p) and ppl(ref):
            ref_bytes = reports[ref]["efficientllm"]["weight_bytes"]
            # quality = 1/perplexity, so perf_comp/perf_orig = ppl_ref / ppl_p
            mcr = metrics.mcr(ref_bytes, e["weight_bytes"], 1 / ppl(ref), 1 / ppl(p))  # type: ignore[operator]
        rec = {
            "precision": p,
            "engine": e.get("engine"),
            "weight_mb": (e.get("weight_bytes") or 0) / 1e6,
            "amu_gb": e["amu_gb"],
            "al_s": e["al_s"],
            "at_tokens_per_s": e["at_it_tokens_per_s"],
            "tokens_per_s_wall": rep["throughput"]["tokens_per_s_wall"],
            "ttft_p50_s": rep["latency_s"]["ttft"]["p50"],
            "aec_w": e["aec_w"],
            "j_per_token": e["j_per_token"],
            "energy_source": e["energy_source"],
            "perplexity": ppl(p),
            "quality_method": quality.get(p, {}).get("method") or quality.get(p, {}).get("error"),
            "mcr": mcr,
            "ok": rep["requests"]["ok"],
            "total": rep["requests"]["total"],
        }
        records.append(rec)

        def f(x: Any, d: int = 3) -> str:
            return "—" if x is None else f"{x:.{d}g}"

        rows.append(
            [
                p,
                str(rec["engine"]),
                f(rec["weight_mb"], 4),
                f(rec["amu_gb"]),
                f(rec["al_s"]),
                f(rec["at_tokens_per_s"], 4),
                f(rec["tokens_per_s_wall"], 4),
                f((rec["ttft_p50_s"] or 0) * 1e3, 4),
                f(rec["aec_w"]),
                f(rec["j_per_token"]),
                str(rec["energy_source"]),
                f(rec["perplexity"], 4) + f" [{rec['quality_method']}]",
                f(mcr),
                f"{rec['ok']}/{rec['total']}",
            ]
        )
    for p, why in failed.items():
        rows.append([p, "—", *["—"] * (len(COLUMNS) - 5), why[:160], "—", "0/0"])
        records.append({"precision": p, "error": why})
    note = (
        f"MCR reference: {ref}; quality = 1/perplexity on the built-in held-out texts, scored with "
        "transformers in a separate process at the same precision. AMU = mean RSS of the server process "
        "tree; AL = mean request latency; AT = IT = Σ tokens / Σ latencies; AEC = mean power over the "
        "campaign window."
    )
    return {"columns": COLUMNS, "rows": rows, "records": records, "reference": ref, "note": note}


def run_precision(
    workload: Workload,
    *,
    serve_args: str,
    precisions: list[str],
    extra: dict[str, str],
    run_dir: Path,
    duration_s: float,
    timeout_s: float,
    slo: Slo,
    quality: str = "perplexity",
    traces: tuple[Path, ...] = (),
) -> dict[str, Any]:
    reports: dict[str, dict[str, Any]] = {}
    qual: dict[str, dict[str, Any]] = {}
    failed: dict[str, str] = {}
    for p in precisions:
        sub = run_dir / p
        try:
            server = ServerHandle.start(f"{serve_args} --precision {p} {extra.get(p, '')}", sub)
        except (RuntimeError, TimeoutError) as err:
            failed[p] = str(err).strip().splitlines()[-1] if str(err).strip() else type(err).__name__
            continue
        try:
            cfg = LoadConfig(
                targets=(server.target,),
                workload=workload,
                duration_s=duration_s,
                timeout_s=timeout_s,
                run_dir=str(sub),
            )
            rep = run(
                Campaign(
                    cfg,
                    slo=slo,
                    traces=traces,
                    server_pid=server.proc.pid,
                    server_run_dir=server.run_dir,
                    label=p,
                )
            )
        finally:
            server.stop()
        reports[p] = rep
        if quality == "perplexity":
            qual[p] = score(_model_path(serve_args), p)
    tab = table(reports, qual, failed)
    write(run_dir, {p: replace_label(r, p) for p, r in reports.items()}, tab)
    (run_dir / "precision.json").write_text(
        json.dumps({"table": tab, "quality": qual}, indent=1, default=str)
    )
    return {"reports": reports, "precision": tab, "quality": qual}


def replace_label(rep: dict[str, Any], label: str) -> dict[str, Any]:
    return {**rep, "meta": {**rep["meta"], "label": label}}
