"""`effllm load`: flags -> Workload + LoadConfig + Campaign, run it (or a precision sweep), print a summary.

Examples:
  effllm load --target 127.0.0.1:50051 --rate 2 --duration 30 --slo ttft=0.5,tpot=0.1
  effllm load --serve "--kv-cache-gib 0.25" --users 4 --duration 20 --workers 2
  effllm load --serve "--kv-cache-gib 0.25" --precisions fp32,bf16 --rate 1 --duration 20
  effllm load --target 127.0.0.1:50051 --rate 1 --objectives latency=0.4,energy=0.4,quality=0.2 --ignore-eos
This process never imports locust (Locust runs in subprocesses, see loadtest/campaign.py).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Literal

from ..common.budget import Budget
from .config import LoadConfig
from .objectives import ModelMix, ObjectiveMix
from .report import Slo
from .workload import AdapterMix, Arrivals, LengthDist, PromptSource, Shape, Workload


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "load",
        help="run a headless Locust campaign against effllm servers and report",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    g = p.add_argument_group("target")
    g.add_argument("--target", action="append", default=[], help="server address; repeat for several")
    g.add_argument(
        "--serve",
        default=None,
        metavar="ARGS",
        help='start `effllm serve ARGS` on a free loopback port for the campaign, e.g. "--kv-cache-gib 0.25"',
    )
    g.add_argument(
        "--server-pid", type=int, default=None, help="watch this server process tree (memory, CPU)"
    )
    g.add_argument(
        "--server-run-dir",
        type=Path,
        default=None,
        help="the server's telemetry run dir (traces.jsonl, resource-samples.jsonl); automatic with --serve",
    )
    g.add_argument(
        "--traces",
        action="append",
        default=[],
        type=Path,
        help="server trace file or directory (OTLP/JSON lines) to join",
    )
    g = p.add_argument_group("load")
    g.add_argument(
        "--duration", type=float, default=30.0, help="seconds of arrivals (in-flight requests then finish)"
    )
    g.add_argument("--rate", type=float, default=None, help="open loop: target req/s")
    g.add_argument("--users", type=int, default=None, help="closed loop: concurrent users")
    g.add_argument("--think", type=float, default=0.0, help="closed loop: seconds between a user's requests")
    g.add_argument("--arrivals", choices=("poisson", "gamma"), default="poisson")
    g.add_argument("--burstiness", type=float, default=1.0, help="gamma shape: 1 = Poisson, < 1 burstier")
    g.add_argument(
        "--shape",
        choices=("constant", "step", "ramp"),
        default="constant",
        help="rate (open) or users (closed) over time, from --shape-start to --shape-end over --duration",
    )
    g.add_argument("--shape-start", type=float, default=None)
    g.add_argument("--shape-end", type=float, default=None)
    g.add_argument("--step-s", type=float, default=10.0)
    g.add_argument(
        "--workers", type=int, default=0, help="distributed Locust: a master and N workers on loopback"
    )
    g.add_argument("--timeout", type=float, default=60.0, help="gRPC deadline per request (s)")
    g.add_argument(
        "--no-stream", action="store_true", help="unary Generate (no TTFT) instead of GenerateStream"
    )
    g = p.add_argument_group("workload")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument(
        "--prompt-len", default="32", help="tokens: N, uniform:LO-HI, normal:M,S, lognormal:M,SIGMA"
    )
    g.add_argument("--output-len", default="32", help="max new tokens, same forms as --prompt-len")
    g.add_argument("--prompts", type=Path, default=None, help='JSONL of {"prompt"} or {"messages"} lines')
    g.add_argument("--chat-share", type=float, default=0.0, help="share of synthetic requests sent as chats")
    g.add_argument("--temperature", type=float, default=0.0)
    g.add_argument(
        "--ignore-eos",
        action="store_true",
        help="decode exactly --output-len tokens per request (else it is a cap the model may stop under)",
    )
    g.add_argument("--adapters", default="", help="comma-separated adapter names (rank order for zipf)")
    g.add_argument("--popularity", choices=("uniform", "zipf", "round_robin"), default="uniform")
    g.add_argument("--zipf-alpha", type=float, default=1.0)
    g.add_argument("--base-share", type=float, default=0.0, help="share of requests for the base model")
    g.add_argument(
        "--objectives",
        default="",
        metavar="NAME=W,...",
        help="each request's objective, drawn from this mix by weight, e.g. "
        "latency=0.4,energy=0.4,quality=0.2 (latency, energy, quality, balanced, unspecified); "
        "the report gains a per-objective table",
    )
    g.add_argument(
        "--models",
        default="",
        metavar="NAME=W,...",
        help="each request's base model on a server hosting several, drawn from this mix by weight, e.g. "
        "smollm2-135m=0.7,gemma3-270m=0.3 (the same arrivals and prompts whatever the mix); the report "
        "gains a per-model table",
    )
    g.add_argument(
        "--budget",
        default="",
        metavar="KEY=V,...",
        help="limits every request carries: max_ttft_s, max_tpot_s, max_j_per_token, min_quality (0-1)",
    )
    g = p.add_argument_group("report")
    g.add_argument("--slo", default="", help="goodput SLOs in seconds, e.g. ttft=0.5,tpot=0.1")
    g.add_argument("--run-dir", type=Path, default=Path("runs/load"))
    g.add_argument("--label", default="campaign")
    g = p.add_argument_group("precision campaign")
    g.add_argument(
        "--precisions", default="", help="e.g. fp32,bf16,fp16,int4: one server per precision (needs --serve)"
    )
    g.add_argument(
        "--precision-args",
        action="append",
        default=[],
        metavar="P=ARGS",
        help='extra serve args for one precision, e.g. int4="--engine hf"',
    )
    g.add_argument(
        "--quality",
        choices=("perplexity", "none"),
        default="perplexity",
        help="quality score for MCR: held-out perplexity in a separate scoring process",
    )
    p.set_defaults(func=run)


def workload_from_args(a: argparse.Namespace) -> Workload:
    """The Workload the flags describe; a bad value raises ValueError naming the flag (`a.flag_prefix`
    is "--effllm-" for Locust's own options, see options.py)."""
    prefix = getattr(a, "flag_prefix", "--")
    if (a.rate is None) == (a.users is None):
        raise ValueError("give --rate (open loop) or --users (closed loop)")
    mode: Literal["open", "closed"] = "open" if a.rate is not None else "closed"
    base = a.rate if mode == "open" else float(a.users)
    shape = None
    if a.shape != "constant" or a.shape_start is not None:
        start = a.shape_start if a.shape_start is not None else base
        end = a.shape_end if a.shape_end is not None else base
        shape = Shape(a.shape, start, end, a.duration, a.step_s)
    names = tuple(n for n in a.adapters.split(",") if n)
    prompts = (
        PromptSource("jsonl", path=str(a.prompts))
        if a.prompts
        else PromptSource(
            "chat" if a.chat_share else "synthetic",
            LengthDist.parse(a.prompt_len),
            chat_share=a.chat_share or 0.5,
        )
    )
    return Workload(
        seed=a.seed,
        mode=mode,
        rate=a.rate or 0.0,
        users=a.users or 0,
        think_s=a.think,
        arrivals=Arrivals(a.arrivals, a.burstiness),
        prompts=prompts,
        output=LengthDist.parse(a.output_len),
        adapters=AdapterMix(a.popularity if names else "none", names, a.zipf_alpha, a.base_share),
        shape=shape,
        temperature=a.temperature,
        ignore_eos=a.ignore_eos,
        objectives=ObjectiveMix.parse(getattr(a, "objectives", "") or "", f"{prefix}objectives"),
        budget=Budget.parse(getattr(a, "budget", "") or "", f"{prefix}budget"),
        models=ModelMix.parse(getattr(a, "models", "") or "", f"{prefix}models"),
    )


def run(a: argparse.Namespace) -> int:
    from . import render
    from .campaign import Campaign, ServerHandle
    from .campaign import run as run_campaign

    try:
        workload = workload_from_args(a)
        slo = Slo.parse(a.slo)
    except ValueError as err:
        print(f"effllm load: {err}", file=sys.stderr)
        return 2
    if a.precisions:
        from .precision import run_precision

        if a.serve is None:
            print("effllm load: --precisions needs --serve (one server per precision)", file=sys.stderr)
            return 2
        extra = dict(x.split("=", 1) for x in a.precision_args)
        out = run_precision(
            workload,
            serve_args=a.serve,
            precisions=a.precisions.split(","),
            extra=extra,
            run_dir=a.run_dir,
            duration_s=a.duration,
            timeout_s=a.timeout,
            slo=slo,
            quality=a.quality,
            traces=tuple(a.traces),
        )
        print(json.dumps(out["precision"]["rows"], indent=1))
        print(f"report: {a.run_dir / 'report.html'}")
        return 0
    server = ServerHandle.start(a.serve, a.run_dir) if a.serve is not None else None
    try:
        targets = tuple(a.target) or ((server.target,) if server else ("127.0.0.1:50051",))
        cfg = LoadConfig(
            targets=targets,
            workload=workload,
            duration_s=a.duration,
            timeout_s=a.timeout,
            run_dir=str(a.run_dir),
            stream=not a.no_stream,
        )
        campaign = Campaign(
            cfg,
            slo=slo,
            workers=a.workers,
            traces=tuple(a.traces),
            server_pid=a.server_pid or (server.proc.pid if server else None),
            server_run_dir=a.server_run_dir or (server.run_dir if server else None),
            label=a.label,
        )
        report = run_campaign(campaign)
    finally:
        if server:
            server.stop()
    r, t, lat = report["requests"], report["throughput"], report["latency_s"]
    print(
        f"{r['ok']}/{r['total']} ok in {report['wall_s']:.1f}s; {t['tokens_per_s_wall']:.1f} tok/s; "
        f"TTFT p50 {(lat['ttft']['p50'] or 0) * 1e3:.0f} ms; E2E p50 {lat['e2e']['p50']:.2f} s; "
        f"goodput {report['goodput']['share'] * 100:.0f} %"
    )
    if report.get("per_objective"):
        print(render.objective_table_md(report["per_objective"]))
    if report.get("per_model"):
        print(render.objective_table_md(report["per_model"], "model"))
    print(f"report: {a.run_dir / 'report.html'}")
    return 0
