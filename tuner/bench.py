"""`effllm tuner bench`: each method through our loop and through PEFT + HF Trainer, side by side.

Same data, seed, micro-batches, sequence length, precision, optimizer and threads on both sides; each run is
its own process (bench_run.py) so peak RSS is per run; the order alternates per method (ours first for the
1st, 3rd, ... method, the Trainer first for the others) so a drifting machine load does not favour one side.
Printed per method: tokens/s, step latency p50, first step (warm-up), peak RSS, energy (labelled with its
source: `estimated` unless a hardware counter was read), loss at fixed steps, held-out loss and exact match
(one evaluate() for the base and for both tuned models), then ours/theirs ratios. `--ablate packing,...`
adds runs of our loop with one speed-up flipped, each compared with our default run.
Invariant: a ratio is printed only between runs that trained on the same number of real tokens and target
tokens (`compare` raises MismatchedRuns otherwise, and the table says why instead of a number).
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..telemetry.machine import load_average
from ..telemetry.machine import machine as this_machine
from .config import METHODS, TuneConfig

SWITCHES = ("packing", "logits_on_targets", "compile", "gradient_checkpointing")


class MismatchedRuns(ValueError):
    """Two runs did not train on the same tokens: any ratio between them would compare different work."""


@dataclass(frozen=True)
class Comparison:
    tokens_per_s: float  # ours / theirs: > 1 is faster
    step_latency_p50: float  # ours / theirs: < 1 is faster
    peak_rss: float  # ours / theirs: < 1 is leaner
    energy: float  # ours / theirs (both estimated the same way)
    final_loss_delta: float  # (ours - theirs) / theirs


def compare(ours: dict[str, Any], theirs: dict[str, Any]) -> Comparison:
    for key in ("tokens", "target_tokens"):
        if ours[key] != theirs[key]:
            raise MismatchedRuns(
                f"{key} differ: {ours[key]} vs {theirs[key]}; no ratio between different work"
            )
    return Comparison(
        tokens_per_s=ours["tokens_per_s"] / theirs["tokens_per_s"],
        step_latency_p50=ours["step_latency_p50_s"] / theirs["step_latency_p50_s"],
        peak_rss=ours["peak_rss_gb"] / theirs["peak_rss_gb"],
        energy=ours["energy"]["joules"] / theirs["energy"]["joules"],
        final_loss_delta=(ours["train_loss"][-1] - theirs["train_loss"][-1]) / theirs["train_loss"][-1],
    )


def bench_config(method: str, task: str, steps: int, overrides: list[str]) -> TuneConfig:
    raw: dict[str, Any] = {
        "method": method,
        "data": f"task:{task}",
        "max_steps": steps,
        "n_train": 256,
        "n_eval": 64,
        "max_length": 96,
        "batch_size": 8,
        "seed": 0,
        "schedule": "linear",
        "eval_max_new_tokens": 32,
    }
    # One lr does not suit every method: full and freeze move all of a layer's weights at once.
    raw["lr"] = {"full": 2e-5, "freeze": 1e-4}.get(method, 1e-3)
    raw["target_modules"] = ("q_proj", "k_proj", "v_proj", "o_proj")
    for item in overrides:
        key, _, value = item.partition("=")
        raw[key] = value
    return TuneConfig.from_dict(raw)


def loss_checkpoints(steps: int) -> list[int]:
    """Steps at which the table shows the loss: the first, a quarter, half, three quarters, the last."""
    return sorted({1, *(max(1, math.ceil(steps * q)) for q in (0.25, 0.5, 0.75)), steps})


def machine() -> dict[str, Any]:
    m = this_machine()
    return {"cpu": m.cpu_model, "cores": m.cores, "load_avg": load_average()}


def run_side(side: str, config: TuneConfig, threads: int, log: Path, timeout_s: float) -> dict[str, Any]:
    spec = json.dumps({"side": side, "config": config.to_dict(), "threads": threads})
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    with log.open("w") as err:
        proc = subprocess.run(
            [sys.executable, "-m", "effllm.tuner.bench_run", spec],
            stdout=subprocess.PIPE,
            stderr=err,
            text=True,
            env=env,
            timeout=timeout_s,
            check=False,
        )
    lines = [line for line in proc.stdout.splitlines() if line.startswith("BENCH_RESULT ")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"bench {side} {config.method}: exit {proc.returncode}; see {log}")
    return json.loads(lines[-1].removeprefix("BENCH_RESULT "))  # type: ignore[no-any-return]


def _f(x: float | None, fmt: str = ".3f") -> str:
    return "-" if x is None else format(x, fmt)


def _row(label: str, r: dict[str, Any], checkpoints: list[int]) -> str:
    after = r.get("eval_after") or {}
    losses = " / ".join(_f(r["train_loss"][k - 1]) for k in checkpoints)
    return (
        f"| {label} | {r['tokens']:,} | {r['tokens_per_s']:.0f} | {r['step_latency_p50_s']:.3f} "
        f"| {r['first_step_s']:.2f} | {r['peak_rss_gb']:.2f} | {r['energy']['joules']:.0f} "
        f"({r['energy']['source']}) | {losses} | {_f(after.get('loss'))} "
        f"| {_f(after.get('exact_match'), '.3f')} |"
    )


def _ratio(label: str, ours: dict[str, Any], theirs: dict[str, Any]) -> str:
    try:
        c = compare(ours, theirs)
    except MismatchedRuns as exc:
        return f"| {label} | refused: {exc} |"
    return (
        f"| {label} | | **{c.tokens_per_s:.2f}x** | {c.step_latency_p50:.2f}x | | {c.peak_rss:.2f}x "
        f"| {c.energy:.2f}x | final loss {c.final_loss_delta * 100:+.1f} % | | |"
    )


def table(report: dict[str, Any]) -> str:
    m, steps = report["machine"], report["steps"]
    checkpoints = loss_checkpoints(steps)
    lines = [
        f"CPU: {m['cpu']} ({m['cores']} cores, {report['threads']} torch threads); load average at start "
        f"{'/'.join(f'{x:.2f}' for x in m['load_avg'])}, at end "
        f"{'/'.join(f'{x:.2f}' for x in report.get('load_avg_end', m['load_avg']))}",
        f"task:{report['task']}, {steps} steps, batch {report['batch_size']}, "
        f"max_length {report['max_length']}, "
        f"autocast {report.get('autocast', '?')}; held-out n={report['n_eval']}, base exact match "
        f"{_f((report.get('base') or {}).get('eval', {}).get('exact_match'))}, base loss "
        f"{_f((report.get('base') or {}).get('eval', {}).get('loss'))}",
        "",
        "| method / side | tokens | tokens/s | step p50 s | first step s | peak RSS GB | energy J "
        f"| loss at steps {','.join(map(str, checkpoints))} | held-out loss | exact match |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for entry in report["methods"]:
        name, ours, theirs = entry["method"], entry.get("ours"), entry.get("hf")
        if ours:
            lines.append(_row(f"{name} / ours", ours, checkpoints))
        if theirs:
            lines.append(_row(f"{name} / PEFT+Trainer", theirs, checkpoints))
        if ours and theirs:
            lines.append(_ratio(f"{name} ours/theirs", ours, theirs))
        for switch, run in entry.get("ablations", {}).items():
            lines.append(_row(f"{name} / ours, {switch}={run['speedups'][switch]}", run, checkpoints))
            if ours:
                lines.append(_ratio(f"{name} default/{switch} flipped", ours, run))
    lines += [
        "",
        "| our loop: mean s per step | collate | forward | backward | optimizer | padding share |",
        "|---|---|---|---|---|---|",
    ]
    for entry in report["methods"]:
        runs = [("", entry.get("ours"))] + [
            (f", {k} flipped", v) for k, v in entry.get("ablations", {}).items()
        ]
        for suffix, run in runs:
            if run and "step_breakdown_s" in run:
                b = run["step_breakdown_s"]
                lines.append(
                    f"| {entry['method']}{suffix} | {b['collate']:.3f} | {b['forward']:.3f} "
                    f"| {b['backward']:.3f} | {b['optimizer']:.3f} | {run['padding_waste'] * 100:.1f} % |"
                )
    return "\n".join(lines)


def main(
    *,
    steps: int,
    task: str,
    methods: list[str],
    hf_trainer: bool,
    out: str,
    overrides: list[str],
    threads: int = 0,
    ablate: list[str] | None = None,
    run_timeout_s: float = 1800.0,
) -> int:
    """Runs pair by pair and rewrites the JSON after each run: an interrupted bench keeps what it measured."""
    methods = list(METHODS) if methods in (["all"], []) else methods
    for switch in ablate or []:
        if switch not in SWITCHES:
            raise ValueError(f"ablate: {switch!r} is not one of {', '.join(SWITCHES)}")
    threads = threads or os.cpu_count() or 1
    configs = [bench_config(m, task, steps, overrides) for m in methods]
    path = Path(out)
    logs = path.parent / f"{path.stem}-logs"
    logs.mkdir(parents=True, exist_ok=True)
    report: dict[str, Any] = {
        "machine": machine(),
        "task": task,
        "steps": steps,
        "threads": threads,
        "batch_size": configs[0].batch_size,
        "max_length": configs[0].max_length,
        "n_eval": configs[0].n_eval,
        "started": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "methods": [],
    }

    def write() -> str:
        report["load_avg_end"] = os.getloadavg()
        text = table(report)
        path.write_text(json.dumps({**report, "table": text}, indent=2) + "\n")
        return text

    print(f"== base model held-out eval (task:{task})", flush=True)
    report["base"] = run_side("base", configs[0], threads, logs / "base.log", run_timeout_s)
    for i, config in enumerate(configs):
        entry: dict[str, Any] = {"method": config.method, "config": config.to_dict(), "ablations": {}}
        report["methods"].append(entry)
        sides = ["ours", "hf"] if hf_trainer else ["ours"]
        for side in sides if i % 2 == 0 else sides[::-1]:  # alternate who goes first
            print(f"== {config.method}: {side}, {steps} steps", flush=True)
            entry[side] = run_side(side, config, threads, logs / f"{config.method}-{side}.log", run_timeout_s)
            report["autocast"] = entry[side]["autocast"]
            write()
        for switch in ablate or []:
            flipped = config.replace(**{switch: not getattr(config, switch)})
            print(f"== {config.method}: ours with {switch}={getattr(flipped, switch)}", flush=True)
            log = logs / f"{config.method}-ours-{switch}.log"
            entry["ablations"][switch] = run_side("ours", flipped, threads, log, run_timeout_s)
            write()
    print(write())
    print(f"wrote {path}")
    return 0
