"""Telemetry on vs off: the same server flags, the same streamed requests, throughput side by side.

Servers run at once, some with the default telemetry (file traces, sampler at 10 Hz, energy
attribution) and some with --no-telemetry. Rounds alternate between them (on, off, off, on, ...) and the
servers not being measured are paused with SIGSTOP (their whole process trees), so none pays for the
others' idle threads. An A/A run (`--on-args=--no-telemetry`) showed that the server started first was
4-6 % slower for reasons of its own, so by default two pairs start in the order on, off, off, on
(`--pairs 2`): what the start order does cancels out of the pooled figures.
Each round streams `--requests` requests through `--concurrency` concurrent streams (greedy, fixed
prompts: all servers produce the same tokens) and counts output tokens / wall-clock seconds, and the CPU
seconds the measured server's process tree used per output token (telemetry's cost shows there even when
other tenants make wall-clock numbers noisy).

    python bench/telemetry_overhead.py --rounds 3 --requests 24 --concurrency 8 --max-new-tokens 64

Prints a table and writes JSON (default runs/bench-telemetry-overhead-<UTC>.json).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import shlex
import signal
import statistics
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path

import psutil
from _harness import closed_loop, header, machine_record, serve, write_report

from effllm.client.launch import ServerProcess

PROMPTS = [
    "Write a long story about a robot who learns to paint.",
    "Explain in detail how a steam engine works.",
    "List the planets of the solar system and describe each one.",
    "Describe a walk through a busy market in the morning.",
]


@dataclass
class Round:
    config: str  # "on" | "off"
    index: int
    server: str  # which server of that config ("on", "on#2", ...)
    requests: int
    output_tokens: int
    wall_s: float
    server_cpu_s: float  # CPU seconds the measured server's process tree used during the round
    main_cpu_s: float  # ... of which its main process (gRPC, asyncio, telemetry; not vLLM's engine core)

    @property
    def cpu_ms_per_token(self) -> float:
        return 1000.0 * self.server_cpu_s / self.output_tokens

    @property
    def tokens_per_s(self) -> float:
        return self.output_tokens / self.wall_s


def start(name: str, extra: list[str], args: argparse.Namespace, work: Path) -> ServerProcess:
    flags = ["--max-concurrency", str(args.concurrency), "--max-context", "1024"]
    flags += ["--kv-cache-gib", str(args.kv_cache_gib), *extra]
    # the launcher pins one OpenMP thread unless told otherwise: here every server gets --threads
    (work / name).mkdir()
    return serve(*flags, logs=work / name, ready_timeout=600, env={"OMP_NUM_THREADS": str(args.threads)})


def _tree(proc: subprocess.Popen[bytes]) -> list[psutil.Process]:
    root = psutil.Process(proc.pid)
    return [root, *root.children(recursive=True)]


def tree_cpu_s(proc: subprocess.Popen[bytes]) -> tuple[float, float]:
    """(CPU seconds of the whole tree, of the main process alone)."""
    total = main = 0.0
    for p in _tree(proc):
        with contextlib.suppress(psutil.Error):
            t = p.cpu_times()
            total += t.user + t.system
            if p.pid == proc.pid:
                main = t.user + t.system
    return total, main


def pause(proc: subprocess.Popen[bytes], on: bool) -> None:
    for p in _tree(proc):
        with contextlib.suppress(psutil.Error):
            p.send_signal(signal.SIGSTOP if on else signal.SIGCONT)


async def load(port: int, n: int, concurrency: int, max_new_tokens: int) -> tuple[int, float]:
    """The harness's closed loop over `n` requests: (tokens received, wall seconds)."""
    requests = [
        {"prompt": PROMPTS[i % len(PROMPTS)], "max_new_tokens": max_new_tokens, "temperature": 0.0}
        for i in range(n)
    ]
    loop = await closed_loop(f"127.0.0.1:{port}", concurrency, requests, timeout=600)
    if loop.failures:
        raise RuntimeError(f"{len(loop.failures)} requests failed: {loop.failures[:3]}")
    return loop.tokens, loop.seconds


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=3, help="rounds per configuration")
    ap.add_argument("--requests", type=int, default=24, help="requests per round")
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--kv-cache-gib", type=float, default=0.25)
    ap.add_argument(
        "--threads",
        type=int,
        default=os.cpu_count() or 1,
        help="OMP_NUM_THREADS for every server (default: all cores, as vLLM's CPU worker takes when unset)",
    )
    ap.add_argument(
        "--on-args", default="", help='more serve flags for the telemetry-on server ("--sample-hz 1")'
    )
    ap.add_argument("--pairs", type=int, default=2, choices=(1, 2), help="1: on, off; 2: on, off, off, on")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    record = machine_record()
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    out = args.out or Path("runs") / f"bench-telemetry-overhead-{stamp}.json"
    work = Path(tempfile.mkdtemp(prefix="effllm-bench-tel-"))
    servers: dict[str, ServerProcess] = {}
    rounds: list[Round] = []
    try:
        names = ["on", "off", "off#2", "on#2"][: 2 * args.pairs]
        for name in names:  # started one after the other, each paused once it serves
            tag = name.replace("#", "")
            flags = ["--run-dir", str(work / f"run-{tag}"), *shlex.split(args.on_args)]
            servers[name] = start(tag, flags if name.startswith("on") else ["--no-telemetry"], args, work)
            pause(servers[name].proc, True)
        for name in names:  # warm-up (not measured)
            pause(servers[name].proc, False)
            asyncio.run(load(servers[name].port, args.concurrency, args.concurrency, 8))
            pause(servers[name].proc, True)
        order = []
        for r in range(args.rounds):
            order += [(n, r) for n in (names if r % 2 == 0 else names[::-1])]
        for name, r in order:
            proc, port = servers[name].proc, servers[name].port
            pause(proc, False)
            cpu0, main0 = tree_cpu_s(proc)
            try:
                tokens, wall = asyncio.run(load(port, args.requests, args.concurrency, args.max_new_tokens))
                cpu1, main1 = tree_cpu_s(proc)
            finally:
                pause(proc, True)
            cpu, main_cpu = cpu1 - cpu0, main1 - main0
            rounds.append(Round(name.split("#")[0], r, name, args.requests, tokens, wall, cpu, main_cpu))
            print(
                f"round {r} {name:>5}: {tokens} tokens in {wall:.2f} s = {tokens / wall:.1f} tok/s, "
                f"server CPU {cpu:.2f} s = {1000 * cpu / max(tokens, 1):.1f} ms/token "
                f"(main process {1000 * main_cpu / max(tokens, 1):.2f} ms/token)",
                flush=True,
            )
    finally:
        for server in servers.values():
            pause(server.proc, False)
            server.stop(timeout=90)

    def summary(name: str) -> dict[str, float]:
        rs = [r for r in rounds if r.config == name]
        tokens = sum(r.output_tokens for r in rs)
        return {
            "median_tokens_per_s": statistics.median(r.tokens_per_s for r in rs),
            "pooled_tokens_per_s": tokens / sum(r.wall_s for r in rs),
            "output_tokens": tokens,
            "server_cpu_ms_per_token": 1000.0 * sum(r.server_cpu_s for r in rs) / tokens,
            "main_cpu_ms_per_token": 1000.0 * sum(r.main_cpu_s for r in rs) / tokens,
        }

    def pct(key: str) -> float:
        return 100.0 * (on[key] - off[key]) / off[key]

    on, off = summary("on"), summary("off")
    change, change_median = pct("pooled_tokens_per_s"), pct("median_tokens_per_s")
    cpu_change, main_change = pct("server_cpu_ms_per_token"), pct("main_cpu_ms_per_token")
    print()
    print(
        f"telemetry overhead: {args.pairs} pair(s) of servers, {args.rounds} rounds x "
        f"{args.requests} requests, {args.concurrency} streams, "
        f"max_new_tokens {args.max_new_tokens}, OMP_NUM_THREADS {args.threads}\n{header(record)}"
    )
    head = (
        "telemetry",
        "pooled tok/s",
        "median tok/s",
        "tokens",
        "server CPU ms/tok",
        "main proc CPU ms/tok",
    )
    print(f"{head[0]:<10} {head[1]:>13} {head[2]:>13} {head[3]:>8} {head[4]:>18} {head[5]:>21}")
    for name, x in (("off", off), ("on", on)):
        print(
            f"{name:<10} {x['pooled_tokens_per_s']:>13.2f} {x['median_tokens_per_s']:>13.2f} "
            f"{int(x['output_tokens']):>8} {x['server_cpu_ms_per_token']:>18.2f} "
            f"{x['main_cpu_ms_per_token']:>21.2f}"
        )
    print(
        f"{'change':<10} {change:>+12.2f}% {change_median:>+12.2f}% {'':>8} {cpu_change:>+17.2f}% "
        f"{main_change:>+20.2f}%"
    )
    print("target: throughput within 3 %; CPU per token is less sensitive to other tenants than wall clock")
    result = {
        "config": vars(args) | {"out": str(out)},
        "rounds": [
            asdict(r) | {"tokens_per_s": r.tokens_per_s, "cpu_ms_per_token": r.cpu_ms_per_token}
            for r in rounds
        ],
        "on": on,
        "off": off,
        "change_pct_pooled": change,
        "server_cpu_per_token_change_pct": cpu_change,
        "main_process_cpu_per_token_change_pct": main_change,
        "change_pct_median": change_median,
        "telemetry_run_dir": str(work / "run-on"),
    }
    write_report(out, result, record)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
