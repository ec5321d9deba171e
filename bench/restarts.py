"""Issue 23's routing-figure check: do start-up figures hold across restarts, and does ENERGY routing pick
the variant that really costs less?

    python bench/restarts.py --variants bf16,int4:hf --restarts 5 --out runs/bench-restarts.json
    effllm bench restarts ...                                       (the same script)

1. `--restarts` times: `effllm serve --variant A --variant B` (a server as a user starts it: no OpenMP
   override), read each variant's start-up figures from GetModelInfo before any request (J/token, TPOT,
   with their spread and sample count), then send `--requests` ENERGY
   requests one at a time (greedy, ignore_eos, exactly `--max-new-tokens` tokens each) and count which
   variant served each; stop the server.
2. Each variant alone (`effllm serve --variant A`): the same requests, its J/token from every final
   message's usage.energy_joules / tokens (the server's attributed, estimated energy).
Prints both tables with lscpu's CPU model and the load average, writes JSON; the verdicts are the issue's:
each variant's start-up J/token spreads by at most 1.3x (max/min over the restarts), and in every restart
the ENERGY requests went to the variant whose J/token served alone is the lower.
Invariant: a request that did not decode exactly --max-new-tokens tokens makes the run exit 1 (no figure
from unequal work).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

from effllm.client.launch import ServerProcess, free_port, wait_serving
from effllm.telemetry.machine import machine

PROMPT = "Here is a long, detailed story about a lighthouse keeper.\n\nChapter 1\n\nIt was"


def start(variants: list[str], log_dir: Path, ready_timeout: float, extra: list[str]) -> ServerProcess:
    """`effllm serve` with the caller's environment as is (no launcher OpenMP default)."""
    port = free_port()
    log_path = log_dir / f"server-{port}.log"
    cmd = [sys.executable, "-m", "effllm.cli.main", "serve", "--port", str(port), *extra]
    for v in variants:
        cmd += ["--variant", v]
    with log_path.open("wb") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    server = ServerProcess(proc, port, log_path)
    wait_serving(server, ready_timeout)
    return server


def start_figures(server: ServerProcess) -> dict[str, dict[str, Any]]:
    with server.client(timeout=30.0) as client:
        info = client.model_info()
    out = {}
    for v in info.variants:
        live = v.live
        fig: dict[str, Any] = {
            "j_per_token": live.joules_per_token,
            "tpot_s": live.time_per_output_token_s,
            "ttft_s": live.time_to_first_token_s,
            "energy_source": live.energy_source,
        }
        j = live.joules  # the start-up figure as a measurement: median, interval, sample count
        fig.update(j_median=j.median, j_low=j.low, j_high=j.high, j_samples=j.samples)
        out[v.name] = fig
    return out


def send(server: ServerProcess, n: int, tokens: int, objective: str) -> list[dict[str, Any]]:
    rows = []
    with server.client(timeout=300.0) as client:
        for _ in range(n):
            reply = client.generate(
                PROMPT, max_new_tokens=tokens, temperature=0.0, ignore_eos=True, objective=objective
            )
            out_tokens = reply.usage.output_tokens
            if out_tokens != tokens:
                raise SystemExit(f"a request decoded {out_tokens} tokens, not {tokens}: no figure from it")
            energy = reply.usage.energy_joules if reply.usage.HasField("energy_joules") else None
            rows.append({"variant": reply.variant, "tokens": out_tokens, "energy_j": energy})
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--variants", default="bf16,int4:hf")
    ap.add_argument("--restarts", type=int, default=5)
    ap.add_argument("--requests", type=int, default=8, help="ENERGY requests per server")
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--ready-timeout", type=float, default=900.0)
    ap.add_argument("--serve-arg", action="append", default=[], help="extra `effllm serve` argument")
    ap.add_argument("--out", type=Path, default=Path("runs/bench-restarts.json"))
    a = ap.parse_args(argv)
    variants = [v.strip() for v in a.variants.split(",") if v.strip()]
    logs = Path(tempfile.mkdtemp(prefix="effllm-restarts-"))
    result: dict[str, Any] = {"machine": machine().to_dict(), "variants": variants, "restarts": []}
    result["load_before"] = os.getloadavg()

    for i in range(a.restarts):
        t0 = time.perf_counter()
        server = start(variants, logs, a.ready_timeout, a.serve_arg)
        try:
            ready_s = time.perf_counter() - t0
            figures = start_figures(server)
            rows = send(server, a.requests, a.max_new_tokens, "energy")
        finally:
            server.stop()
        served = Counter(r["variant"] for r in rows)
        result["restarts"].append({"ready_s": ready_s, "start_figures": figures, "energy_served": served})
        print(f"restart {i + 1}: ready in {ready_s:.1f}s, ENERGY served on {dict(served)}", flush=True)

    alone: dict[str, Any] = {}
    for v in variants:
        server = start([v], logs, a.ready_timeout, a.serve_arg)
        try:
            send(server, 1, a.max_new_tokens, "energy")  # warm, not counted
            rows = send(server, a.requests, a.max_new_tokens, "energy")
        finally:
            server.stop()
        per_token = [r["energy_j"] / r["tokens"] for r in rows if r["energy_j"] is not None]
        alone[v] = {
            "j_per_token_median": statistics.median(per_token) if per_token else None,
            "j_per_token_min": min(per_token, default=None),
            "j_per_token_max": max(per_token, default=None),
            "n": len(per_token),
        }
    result["alone"] = alone
    result["load_after"] = os.getloadavg()

    # verdicts
    names = [f["start_figures"] for f in result["restarts"]]
    keys = sorted({k for f in names for k in f})
    spread = {}
    for k in keys:
        values = [f[k]["j_per_token"] for f in names if k in f and f[k]["j_per_token"] > 0]
        spread[k] = max(values) / min(values) if values else None
    known = {k: v["j_per_token_median"] for k, v in alone.items() if v["j_per_token_median"]}
    cheaper = min(known, key=lambda k: known[k]) if known else None
    # a variant named PRECISION alone on the command line is PRECISION:ENGINE in replies
    cheaper_names = {n for n in keys if cheaper and (n == cheaper or n.startswith(cheaper + ":"))}
    routed_right = [set(r["energy_served"]) <= cheaper_names for r in result["restarts"]]
    result["verdict"] = {
        "start_j_per_token_spread": spread,
        "spread_ok": all(s is not None and s <= 1.3 for s in spread.values()),
        "cheaper_alone": cheaper,
        "energy_routed_to_cheaper": routed_right,
        "routing_ok": all(routed_right),
    }

    m = result["machine"]
    print(
        f"\nCPU: {m.get('cpu_model')} ({m.get('cpu_count')} cores); load avg before {result['load_before']}"
    )
    print(f"{'restart':>7}  " + "  ".join(f"{k + ' J/tok (start)':>26}" for k in keys) + "  ENERGY served on")
    for i, r in enumerate(result["restarts"]):
        cells = "  ".join(
            f"{r['start_figures'].get(k, {}).get('j_per_token', float('nan')):>26.3f}" for k in keys
        )
        print(f"{i + 1:>7}  {cells}  {dict(r['energy_served'])}")
    print("spread max/min: " + ", ".join(f"{k} {v:.2f}x" for k, v in spread.items() if v is not None))
    print("\nserved alone (same requests):")
    for k, v in alone.items():
        print(f"  {k:>10}: {v['j_per_token_median']:.3f} J/token median (n={v['n']})")
    print(f"\nverdict: {json.dumps(result['verdict'])}\nload avg after {result['load_after']}")
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(result, indent=2, default=str))
    return 0 if result["verdict"]["spread_ok"] and result["verdict"]["routing_ok"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
