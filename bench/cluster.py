"""Issue 25's cluster figures: what the front's hop costs, and adapter affinity and failover under a Zipf
campaign. Prints tables (with the CPU and load average) and writes JSON.

1. `--part hop`: the plain server against `--replicas 1` behind the cluster front, same flags, same
   requests (completion prompts, greedy, ignore_eos, exactly --max-new-tokens each) through the harness's
   closed loop at --concurrency, --repeats alternating runs. Reports each side's tok/s and client-side
   p50 TTFT, the ratio front/plain (median and min..max over the repeats) and the added p50 TTFT in ms.
   OMP_NUM_THREADS is --threads on both sides (Ray's workers inherit it).
2. `--part campaign`: `--replicas 2` with --adapters adapters under one adapter root, two of them pinned
   through the front (cluster-wide), then `effllm load --target FRONT` (Locust, closed loop, Zipf
   popularity): a warm-up (one request per adapter, then a --warm-up campaign), then the measured one.
   Warm share = requests served by a replica that already held their adapter (GetStats
   adapter_requests_warm / (warm + cold), the measured campaign's deltas), loads per replica, failed
   requests by status. With --kill, one replica's process is SIGKILLed halfway through the measured
   campaign: a failed request that had received no token is a defect (the
   front retries those); the replacement replica must hold the pinned set before it serves.

    python bench/cluster.py --part hop --precision bf16 --repeats 3
    python bench/cluster.py --part campaign --adapters 24 --duration 120 --kill
Invariant: a hop row whose sides did not each decode exactly --max-new-tokens per request is refused (exit 1).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import psutil
from _harness import closed_loop, header, machine_record, serve, write_report

from effllm.api.v1 import generation_pb2 as pb
from effllm.client import EffllmClient
from effllm.client.launch import ServerProcess

PROMPT = "Here is a long, detailed story about a lighthouse keeper.\n\nChapter {i}\n\nIt was"


def server_flags(a: argparse.Namespace, replicas: int, extra: list[str]) -> list[str]:
    flags = ["--engine", a.engine, "--precision", a.precision, "--max-concurrency", str(a.concurrency)]
    flags += ["--max-context", "512", "--no-telemetry", *a.serve_arg, *extra]
    if replicas:
        flags += ["--replicas", str(replicas), "--ray-cpus", str(os.cpu_count() or 2)]
        flags += ["--replica-cpus", str(a.replica_cpus)]
    return flags


def start(a: argparse.Namespace, replicas: int, logs: Path, extra: list[str] | None = None) -> ServerProcess:
    env = {"OMP_NUM_THREADS": str(a.threads)}
    return serve(*server_flags(a, replicas, extra or []), logs=logs, ready_timeout=900, env=env)


# -- 1. the hop -------------------------------------------------------------------------------------------
def hop(a: argparse.Namespace, logs: Path) -> dict[str, Any]:
    one = {"max_new_tokens": a.max_new_tokens, "temperature": 0.0, "ignore_eos": True}
    requests = [{"prompt": PROMPT.format(i=i + 1), **one} for i in range(a.requests)]
    runs: dict[str, list[dict[str, Any]]] = {"plain": [], "front": []}
    for repeat in range(a.repeats):
        for side in ("plain", "front") if repeat % 2 == 0 else ("front", "plain"):
            server = start(a, 1 if side == "front" else 0, logs)
            try:
                loop = asyncio.run(
                    closed_loop(server.target, a.concurrency, requests, warm_up={"prompt": "Hi", **one})
                )
            finally:
                server.stop(timeout=120)
            run = {
                "tokens_per_s": loop.tokens_per_s,
                "ttft_p50_s": loop.ttft_p50_s,
                "exact": loop.exact(len(requests), a.max_new_tokens),
                "counts": loop.counts,
                "failures": loop.failures,
            }
            runs[side].append(run)
            print(
                f"  [{repeat}] {side:>5}: {loop.tokens_per_s:7.1f} tok/s, p50 TTFT "
                f"{1e3 * (loop.ttft_p50_s or 0):.0f} ms{'' if run['exact'] else '  UNEQUAL WORK'}",
                flush=True,
            )
    exact = all(r["exact"] for rs in runs.values() for r in rs)
    pairs = list(zip(runs["plain"], runs["front"], strict=True))
    ratios = [f["tokens_per_s"] / p["tokens_per_s"] for p, f in pairs]
    added = [1e3 * (f["ttft_p50_s"] - p["ttft_p50_s"]) for p, f in pairs]
    return {
        "runs": runs,
        "refused": None if exact else "a side did not decode exactly --max-new-tokens per request",
        "ratio": {
            "median": statistics.median(ratios),
            "min": min(ratios),
            "max": max(ratios),
            "n": len(ratios),
        },
        "added_ttft_ms": {"median": statistics.median(added), "min": min(added), "max": max(added)},
    }


# -- 2. the campaign --------------------------------------------------------------------------------------
def stats(target: str) -> pb.ServerStats:
    with EffllmClient(target, timeout=120) as c:
        return c.stats()


def load(target: str, names: list[str], a: argparse.Namespace, run_dir: Path, duration: float) -> list[dict]:
    """`effllm load --target` the front: closed loop, Zipf over `names`; the request rows it wrote."""
    cmd = [sys.executable, "-m", "effllm.cli.main", "load", "--target", target, "--users", str(a.users)]
    cmd += ["--duration", str(duration), "--adapters", ",".join(names), "--popularity", "zipf"]
    cmd += ["--ignore-eos", "--output-len", str(a.max_new_tokens), "--timeout", "300"]
    cmd += ["--run-dir", str(run_dir), "--seed", str(a.seed)]
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    return [json.loads(line) for f in sorted(run_dir.glob("requests-*.jsonl")) for line in f.open()]


def replica_processes(front_pid: int) -> dict[int, str]:
    """pid -> name of the Serve replica processes under the front (Ray names them after the actor)."""
    out = {}
    for p in psutil.Process(front_pid).children(recursive=True):
        try:
            title = " ".join(p.cmdline())
        except psutil.Error:
            continue
        if "ServeReplica:" in title:  # ray::ServeReplica:effllm:effllm-replica
            out[p.pid] = title[:80]
    return out


def campaign(a: argparse.Namespace, logs: Path) -> dict[str, Any]:
    sys.path.insert(0, str(Path(__file__).parent))
    from adapters import make_root

    from effllm.common.model import resolve_model

    root = make_root(logs, resolve_model(None).path, [8], {8: a.adapters})
    names = [f"r8-{i}" for i in range(a.adapters)]
    extra = ["--adapter-root", str(root), "--max-adapters-resident", str(a.adapters + 4)]
    extra += ["--max-adapter-rank", "16", "--queue-size", "64"]
    server = start(a, 2, logs, extra)
    out: dict[str, Any] = {"adapters": a.adapters, "pinned": names[:2]}
    try:
        with EffllmClient(server.target, timeout=300) as c:
            for name in names[:2]:  # cluster-wide, and into the ledger a replacement replica replays
                c.load_adapter(name, "1")
                c.pin_adapter(name, "1")
        # warm-up: one request per adapter (each is loaded on the replica it is assigned to), then a short
        # campaign; the measured one follows
        touch = [{"prompt": "Hi", "adapter": n, "max_new_tokens": 2} for n in names]
        warm = asyncio.run(closed_loop(server.target, a.users, touch, timeout=600))
        print(f"  warm-up: {len(warm.counts)} adapters touched, {len(warm.failures)} failed", flush=True)
        if a.warm_up > 0:
            print(f"  warm-up campaign ({a.warm_up:.0f} s)", flush=True)
            load(server.target, names, a, logs / "warm-up", a.warm_up)
        before = stats(server.target)
        killed: dict[str, Any] = {}
        if a.kill:
            victims = replica_processes(server.proc.pid)

            def kill() -> None:
                time.sleep(a.duration / 2)
                pid = sorted(victims)[0]
                killed.update(pid=pid, at_s=a.duration / 2, title=victims[pid])
                os.kill(pid, signal.SIGKILL)

            threading.Thread(target=kill, daemon=True).start()
            print(f"  replica processes: {victims}", flush=True)
        print(f"  measured campaign ({a.duration:.0f} s){', one replica killed halfway' if a.kill else ''}")
        rows = load(server.target, names, a, logs / "measured", a.duration)
        if a.kill:  # the replacement: up again, holding the pinned set
            deadline = time.monotonic() + 600
            while time.monotonic() < deadline:
                now = stats(server.target)
                if len(now.replicas) == 2 and set(now.replicas) != set(before.replicas):
                    break
                time.sleep(5)
            with EffllmClient(server.target, timeout=120) as c:
                listed = c.list_adapters()
            new = sorted(set(stats(server.target).replicas) - set(before.replicas))
            held = {f"{x.name}@{x.version}": {r.replica for r in x.replicas} for x in listed}
            killed["replacement"] = new
            killed["replacement_holds_pinned"] = bool(new) and all(
                new[0] in held.get(f"{n}@1", set()) for n in names[:2]
            )
        after = stats(server.target)
    finally:
        server.stop(timeout=180)
    # per replica alive at the end (a killed replica's counts die with it; a replacement starts at 0)
    warm = cold = 0
    for rid, now in after.replicas.items():
        was = before.replicas[rid] if rid in before.replicas else pb.ServerStats()
        warm += now.adapter_requests_warm - was.adapter_requests_warm
        cold += now.adapter_requests_cold - was.adapter_requests_cold
    failed: dict[str, int] = {}
    for r in rows:
        if r.get("status") != "OK":
            failed[r["status"]] = failed.get(r["status"], 0) + 1
    out.update(
        requests=len(rows),
        ok=sum(r.get("status") == "OK" for r in rows),
        failed=failed,
        failed_before_any_token=sum(
            r.get("status") != "OK" and not r.get("received_tokens") and r.get("status") != "CANCELLED"
            for r in rows
        ),
        warm=warm,
        cold=cold,
        warm_share=warm / (warm + cold) if warm + cold else None,
        loads_per_replica={rid: s.adapter_loads_on_demand for rid, s in after.replicas.items()},
        loads_per_replica_before={rid: s.adapter_loads_on_demand for rid, s in before.replicas.items()},
        served_per_replica={
            k: sum(r.get("replica") == k for r in rows) for k in {r.get("replica") for r in rows} if k
        },
        killed=killed,
    )
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--part", choices=("hop", "campaign"), required=True)
    ap.add_argument("--engine", default="hf")
    ap.add_argument("--precision", default="fp32")
    ap.add_argument("--concurrency", type=int, default=8, help="hop: closed-loop streams; slots per replica")
    ap.add_argument("--requests", type=int, default=32, help="hop: requests per run")
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3, help="hop: alternating runs of each side")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="OMP_NUM_THREADS, every side")
    ap.add_argument("--replica-cpus", type=float, default=1.0)
    ap.add_argument("--adapters", type=int, default=24, help="campaign: adapters under the root")
    ap.add_argument("--users", type=int, default=8, help="campaign: Locust users (closed loop)")
    ap.add_argument("--warm-up", type=float, default=60.0, help="campaign: seconds of the warm-up campaign")
    ap.add_argument("--duration", type=float, default=120.0, help="campaign: seconds of the measured one")
    ap.add_argument("--kill", action="store_true", help="campaign: SIGKILL one replica halfway")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--serve-arg", action="append", default=[], help="extra `effllm serve` flag, every side")
    ap.add_argument("--out", type=Path, default=None)
    a = ap.parse_args()
    record = machine_record()
    out = a.out or Path("runs") / f"bench-cluster-{a.part}.json"
    logs = Path(tempfile.mkdtemp(prefix="effllm-bench-cluster-"))
    result = hop(a, logs) if a.part == "hop" else campaign(a, logs)
    write_report(out, {"args": {k: str(v) for k, v in vars(a).items()}, "logs": str(logs), **result}, record)
    print(f"\n{header(record)}")
    if a.part == "hop":
        r, t = result["ratio"], result["added_ttft_ms"]
        print(
            f"front (1 replica) / plain server, c={a.concurrency}, {a.max_new_tokens} tokens per request, "
            f"{a.engine} {a.precision}: tok/s ratio {r['median']:.3f} ({r['min']:.3f}..{r['max']:.3f}, "
            f"n={r['n']}); added p50 TTFT {t['median']:.1f} ms ({t['min']:.1f}..{t['max']:.1f})"
        )
        if result["refused"]:
            print(f"REFUSED: {result['refused']}")
    else:
        share = result["warm_share"]
        print(
            f"campaign: {result['requests']} requests, {result['ok']} OK, failed {result['failed']} "
            f"({result['failed_before_any_token']} before any token); warm share "
            f"{'-' if share is None else f'{100 * share:.1f} %'} "
            f"({result['warm']} warm, {result['cold']} cold)"
        )
        print(f"on-demand loads per replica: {result['loads_per_replica']}")
        print(f"served per replica: {result['served_per_replica']}")
        if result["killed"]:
            print(f"killed: {result['killed']}")
    print(f"wrote {out}")
    return 1 if result.get("refused") else 0


if __name__ == "__main__":
    sys.exit(main())
