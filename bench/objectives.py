"""Issue 14's campaign table: a mixed-objective server against one single-variant server per variant.

    python bench/objectives.py --out runs/bench-objectives [--variants fp32:hf,int4:hf] [--rate 1]
    effllm bench objectives ...                                     (the same script)

Servers, one after another, each on a free loopback port through loadtest's ServerHandle (the launcher
`effllm load --serve` uses): `effllm serve SERVE --variant A --variant B ...` (label "mixed"), then per
variant `effllm serve SERVE --precision P [--engine E]` (label: the variant). Against each, one open-loop
campaign (loadtest/campaign.py) with the same seed, rate, duration, prompts and objective mix, ignore_eos
and one fixed max_new_tokens: the same requests and the same tokens to decode on every server. Then, per
objective: J/token (per-request usage.energy_joules, its source labelled), TTFT p50/p99, quality (the
variants' start-up perplexities), the mixed server's ratios to each single-variant server, and the issue's
targets as PASS/MISS (bench/_objectives_table.py). The comparison is refused (exit 1) when the servers did
not all answer the same requests with the same token counts.

Writes OUT/objectives.json (every campaign's per-objective table and model info, lscpu's CPU model, load
averages around each run, thread counts) and OUT/objectives.md; each campaign's own report lies in
OUT/<label>/. Servers run in sequence, so a machine busy with other work skews the later ones: read the
load averages before trusting a ratio.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
from pathlib import Path
from typing import Any

import _objectives_table as table

from effllm.common.budget import Budget
from effllm.loadtest.objectives import ObjectiveMix
from effllm.loadtest.workload import LengthDist, PromptSource, Workload
from effllm.telemetry.machine import machine as this_machine


def machine() -> dict[str, Any]:
    info: dict[str, Any] = {
        "cpu_count": os.cpu_count(),
        "load_avg": os.getloadavg(),
        # the launcher gives a server one OpenMP thread unless this environment sets another count
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS", "1 (launcher default)"),
        "mkl_num_threads": os.environ.get("MKL_NUM_THREADS"),
    }
    m = this_machine()
    info["cpu_model"], info["cpu_flags"] = m.cpu_model, m.cpu_flags
    return info


def tree_threads(pid: int) -> int | None:
    """Threads of the server's process tree (the engine may run in child processes)."""
    import psutil

    try:
        root = psutil.Process(pid)
        return sum(p.num_threads() for p in [root, *root.children(recursive=True)])
    except psutil.Error:
        return None


def variant_args(spec: str) -> str:
    """`int4:hf` -> `--precision int4 --engine hf` (a single-variant server, as before variants)."""
    precision, _, engine = spec.partition(":")
    return f"--precision {precision}" + (f" --engine {engine}" if engine else "")


def model_info(target: str) -> dict[str, Any]:
    from effllm.client import EffllmClient

    with EffllmClient(target, timeout=30.0) as client:
        info = client.model_info()
    variants = [
        {
            "name": v.name,
            "precision": v.precision,
            "engine": v.engine,
            "weight_bytes": v.weight_bytes,
            "perplexity": v.perplexity,
            "quality": v.quality,
            "live": {
                "ttft_s": v.live.time_to_first_token_s,
                "tpot_s": v.live.time_per_output_token_s,
                "j_per_token": v.live.joules_per_token,
                "energy_source": v.live.energy_source,
                "requests": v.live.requests,
            },
        }
        for v in info.variants
    ]
    return {
        "name": f"{info.precision}:{info.engine}",  # what a single-variant server serves
        "precision": info.precision,
        "engine": info.engine,
        "weight_bytes": info.weight_bytes,
        "variants": variants,
    }


def run_server(label: str, serve: str, workload: Workload, a: argparse.Namespace) -> dict[str, Any]:
    """Start the server, run the campaign against it, stop it; its figures for the comparison."""
    from effllm.loadtest.campaign import Campaign, ServerHandle, run
    from effllm.loadtest.config import LoadConfig
    from effllm.loadtest.report import read_rows

    run_dir = a.out / label.replace(":", "-")
    print(f"+ effllm serve {serve}   [{label}]", flush=True)
    server = ServerHandle.start(serve, run_dir, ready_timeout=a.ready_timeout)
    try:
        before = model_info(server.target)
        load_before = os.getloadavg()
        cfg = LoadConfig(
            targets=(server.target,),
            workload=workload,
            duration_s=a.duration,
            timeout_s=a.timeout,
            run_dir=str(run_dir),
        )
        campaign = Campaign(cfg, server_pid=server.proc.pid, server_run_dir=server.run_dir, label=label)
        report = run(campaign)
        threads = tree_threads(server.proc.pid)
        after = model_info(server.target)  # live figures after the campaign
    finally:
        server.stop()
    return {
        "serve": serve,
        "variant": before["name"] if label != table.MIXED else None,
        "variants": after["variants"] or before["variants"],
        "model_info": before,
        "per_objective": report.get("per_objective", {}),
        "rows": read_rows(run_dir),
        "load_avg_before": load_before,
        "load_avg_after": os.getloadavg(),
        "server_threads": threads,
        "wall_s": report["wall_s"],
    }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("runs/bench-objectives"))
    p.add_argument("--variants", default="fp32:hf,int4:hf", help="PRECISION[:ENGINE] list, comma-separated")
    p.add_argument(
        "--reference",
        default=None,
        help="the variant whose single server the ENERGY target is measured against (default: the first "
        "bf16 variant, else the first variant)",
    )
    p.add_argument("--serve", default="--max-concurrency 8 --max-context 512 --kv-cache-gib 0.25")
    p.add_argument("--objectives", default="latency=0.4,energy=0.4,quality=0.2")
    p.add_argument(
        "--budget", default="", help="max_ttft_s=..,max_tpot_s=..,max_j_per_token=..,min_quality=.."
    )
    p.add_argument(
        "--rate", type=float, default=1.0, help="open-loop req/s (Poisson), the same on every server"
    )
    p.add_argument("--duration", type=float, default=60.0, help="seconds of arrivals per server")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--prompt-len", default="uniform:16-64")
    p.add_argument("--max-new-tokens", type=int, default=32, help="every request decodes exactly this many")
    p.add_argument("--timeout", type=float, default=300.0, help="gRPC deadline per request (s)")
    p.add_argument("--ready-timeout", type=float, default=900.0, help="seconds a server may take to start")
    p.add_argument("--skip", default="", help="servers to leave out: mixed and/or variants, comma-separated")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    variants = [v.strip() for v in a.variants.split(",") if v.strip()]
    if not variants:
        print("--variants: name at least one PRECISION[:ENGINE]", file=sys.stderr)
        return 2
    reference = a.reference or next((v for v in variants if v.split(":")[0] == "bf16"), variants[0])
    if reference not in variants:
        print(f"--reference {reference!r}: not one of --variants {variants}", file=sys.stderr)
        return 2
    try:
        workload = Workload(
            seed=a.seed,
            mode="open",
            rate=a.rate,
            prompts=PromptSource("synthetic", LengthDist.parse(a.prompt_len)),
            output=LengthDist.parse(str(a.max_new_tokens)),
            ignore_eos=True,  # every request decodes exactly max_new_tokens on every server
            objectives=ObjectiveMix.parse(a.objectives),
            budget=Budget.parse(a.budget),
        )
    except ValueError as err:
        print(err, file=sys.stderr)
        return 2
    if workload.objectives is None:
        print("--objectives: the comparison is per objective; give a mix", file=sys.stderr)
        return 2
    skip = {s.strip() for s in a.skip.split(",") if s.strip()}
    plan = [(table.MIXED, " ".join([a.serve, *(f"--variant {shlex.quote(v)}" for v in variants)]))]
    plan += [(v, f"{a.serve} {variant_args(v)}") for v in variants]
    a.out.mkdir(parents=True, exist_ok=True)
    doc: dict[str, Any] = {"args": {k: str(v) for k, v in vars(a).items()}, "machine": machine()}
    servers: dict[str, dict[str, Any]] = {}
    failed: dict[str, str] = {}
    for label, serve in plan:
        if label in skip:
            continue
        try:
            servers[label] = run_server(label, serve, workload, a)
        except (RuntimeError, TimeoutError) as err:  # e.g. a server without --variant, or int4 not here
            lines = str(err).strip().splitlines()
            failed[label] = lines[-1] if lines else type(err).__name__
            print(f"{label}: {failed[label]}", file=sys.stderr)
    doc["failed"] = failed
    if not servers:
        print("no server ran a campaign", file=sys.stderr)
        (a.out / "objectives.json").write_text(json.dumps(doc, indent=1, default=str))
        return 1
    doc["servers"] = {label: {k: v for k, v in s.items() if k != "rows"} for label, s in servers.items()}
    doc["machine"]["load_avg_end"] = os.getloadavg()
    refusal = table.check_same_requests({label: s["rows"] for label, s in servers.items()})
    if refusal is None:
        doc["comparison"] = table.compare(servers, reference, budget=workload.budget is not None)
        text = table.format_markdown(doc["comparison"])
    else:
        doc["refused"] = refusal
        text = f"comparison refused: {refusal}"
    if failed:
        text += "\n\nnot run: " + "; ".join(f"{label}: {why}" for label, why in failed.items())
    m = doc["machine"]
    header = (
        f"# mixed-objective server vs single-variant servers\n\n{m['cpu_model']}, {m['cpu_count']} CPUs, "
        f"load avg at start {m['load_avg'][0]:.2f}; {a.rate} req/s for {a.duration} s per server, seed "
        f"{a.seed}, {a.max_new_tokens} tokens per request, objectives {a.objectives}"
        + (f", budget {a.budget}" if a.budget else "")
        + "\n\n"
    )
    (a.out / "objectives.md").write_text(header + text + "\n")
    (a.out / "objectives.json").write_text(json.dumps(doc, indent=1, default=str))
    print(header + text)
    print(f"wrote {a.out / 'objectives.json'}")
    return 0 if refusal is None and not failed else 1


if __name__ == "__main__":
    sys.exit(main())
