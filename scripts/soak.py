"""Bounded soak on loopback: a real `effllm serve` under a mixed load for N minutes, then stop.

The mix: streamed and unary generations (1-16 new tokens), invalid requests, streams the client abandons
after the first chunk, calls with a deadline too short to finish, and bursts past the queue. Reports
requests served, errors by status code, and the RSS of the server's process tree over time; prints a table
and writes JSON. Exit code 1 if anything answered UNKNOWN/INTERNAL or the server died.

    python scripts/soak.py --minutes 3 --out runs/soak.json
    python scripts/soak.py --target 127.0.0.1:50051 --pid 1234 --minutes 10   # an existing server
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import random
import signal
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

import grpc
import psutil

from effllm.client import AsyncEffllmClient

ROOT = Path(__file__).resolve().parents[1]

BAD = ("INTERNAL", "UNKNOWN", "DATA_LOSS")
PROMPTS = (
    "Tell me about rivers.",
    "Write a haiku about rain.",
    "What is 2 + 2?",
    "Name three colours.",
    "Summarise: the cat sat on the mat.",
)


@dataclass
class Report:
    minutes: float
    concurrency: int
    requests: int = 0
    codes: Counter[str] = field(default_factory=Counter)
    kinds: Counter[str] = field(default_factory=Counter)
    output_tokens: int = 0
    rss_mib: list[tuple[float, float, int, int]] = field(default_factory=list)  # (t, MiB, running, queued)
    server_alive: bool = True
    server_stats: dict[str, int] = field(default_factory=dict)


def tree_rss(pid: int) -> float:
    proc = psutil.Process(pid)
    total = 0
    for p in [proc, *proc.children(recursive=True)]:
        with contextlib.suppress(psutil.Error):
            total += p.memory_info().rss
    return total / (1 << 20)


async def one(client: AsyncEffllmClient, rng: random.Random, report: Report) -> None:
    kind = rng.choices(["stream", "unary", "invalid", "abandon", "deadline"], [45, 20, 15, 10, 10])[0]
    prompt = rng.choice(PROMPTS)
    n = rng.randint(1, 16)
    code = "OK"
    try:
        if kind == "stream":
            async for chunk in client.stream(prompt, max_new_tokens=n):
                if chunk.HasField("final"):
                    report.output_tokens += chunk.final.usage.output_tokens
        elif kind == "unary":
            reply = await client.generate(prompt, max_new_tokens=n)
            report.output_tokens += reply.usage.output_tokens
        elif kind == "invalid":
            bad = rng.choice(
                [
                    dict(temperature=-1.0),
                    dict(top_p=0.0),
                    dict(max_new_tokens=10**9),
                    dict(adapter="../../etc"),
                    dict(stop=[""]),
                    dict(repetition_penalty=float("nan")),
                ]
            )
            await client.generate(prompt, **{"max_new_tokens": 2, **bad})  # type: ignore[arg-type]
        elif kind == "abandon":
            stream = client.stream(prompt, max_new_tokens=64)
            async for _ in stream:
                break  # the client walks away after the first chunk
            await stream.aclose()  # type: ignore[attr-defined]
            code = "ABANDONED"
        else:
            await client.generate(prompt, max_new_tokens=64, timeout=0.05)
    except grpc.RpcError as err:
        code = err.code().name
    report.requests += 1
    report.codes[code] += 1
    report.kinds[kind] += 1
    if code == "RESOURCE_EXHAUSTED":
        await asyncio.sleep(0.25)  # back off as a real client would, instead of spinning on refusals


async def burst(client: AsyncEffllmClient, size: int, report: Report) -> None:
    async def call() -> None:
        code = "OK"
        try:
            await client.generate("Burst!", max_new_tokens=2)
        except grpc.RpcError as err:
            code = err.code().name
        report.requests += 1
        report.codes[code] += 1
        report.kinds["burst"] += 1

    await asyncio.gather(*(call() for _ in range(size)))


async def soak(
    target: str, pid: int | None, minutes: float, concurrency: int, burst_size: int, seed: int
) -> Report:
    report = Report(minutes, concurrency)
    end = time.monotonic() + minutes * 60
    t0 = time.monotonic()
    async with AsyncEffllmClient(target, timeout=60) as client:

        async def worker(i: int) -> None:
            rng = random.Random(seed * 1000 + i)
            while time.monotonic() < end:
                await one(client, rng, report)

        async def sampler() -> None:
            next_burst = time.monotonic() + 20
            while time.monotonic() < end:
                stats = await client.stats()
                rss = tree_rss(pid) if pid else 0.0
                report.rss_mib.append(
                    (round(time.monotonic() - t0, 1), round(rss, 1), stats.running, stats.queued)
                )
                if time.monotonic() > next_burst:
                    await burst(client, burst_size, report)
                    next_burst = time.monotonic() + 20
                await asyncio.sleep(5)

        await asyncio.gather(sampler(), *(worker(i) for i in range(concurrency)))
        await asyncio.sleep(1)
        try:
            assert await client.health() == "SERVING"
            stats = await client.stats()
            report.server_stats = {
                k: int(getattr(stats, k))
                for k in (
                    "running",
                    "queued",
                    "engine_running",
                    "requests_total",
                    "requests_cancelled",
                    "requests_rejected",
                    "output_tokens_total",
                )
            }
            if pid:
                report.rss_mib.append(
                    (round(time.monotonic() - t0, 1), round(tree_rss(pid), 1), stats.running, stats.queued)
                )
        except (grpc.RpcError, AssertionError):
            report.server_alive = False
    return report


def print_report(r: Report) -> None:
    print(f"\nsoak: {r.minutes:g} min, {r.concurrency} concurrent clients")
    print(f"{'requests':<28}{r.requests}")
    print(f"{'output tokens':<28}{r.output_tokens}")
    for code, n in sorted(r.codes.items(), key=lambda kv: -kv[1]):
        print(f"{'  ' + code:<28}{n}")
    print(f"{'kinds':<28}{dict(r.kinds)}")
    if r.rss_mib:
        first, last = r.rss_mib[0][1], r.rss_mib[-1][1]
        peak = max(s[1] for s in r.rss_mib)
        print(f"{'server tree RSS MiB':<28}start {first:.0f} -> end {last:.0f} (peak {peak:.0f})")
        print("  t(s)   RSS MiB  running  queued")
        for t, rss, running, queued in r.rss_mib:
            print(f"  {t:5.0f}  {rss:8.0f}  {running:7d}  {queued:6d}")
    print(f"{'server alive and idle':<28}{r.server_alive} {r.server_stats}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--minutes", type=float, default=3.0)
    ap.add_argument("--concurrency", type=int, default=6)
    ap.add_argument("--burst", type=int, default=40, help="requests fired at once every 20 s")
    ap.add_argument("--target", default=None, help="an existing server (else one is started here)")
    ap.add_argument("--pid", type=int, default=None, help="its pid, for RSS")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=ROOT / "runs" / "soak.json")
    ap.add_argument(
        "--serve-args",
        default="--engine vllm --kv-cache-gib 0.25 --max-context 512 --max-concurrency 4 --queue-size 8",
        help="flags for the server started here",
    )
    args = ap.parse_args()
    server = None
    target, pid = args.target, args.pid
    if target is None:
        from effllm.client.launch import start_server

        args.out.parent.mkdir(parents=True, exist_ok=True)
        server = start_server(*args.serve_args.split(), log_dir=args.out.parent, ready_timeout=900)
        target, pid = server.target, server.proc.pid
        print(f"server {target} pid {pid} (log {server.log_path})")
    try:
        report = asyncio.run(soak(target, pid, args.minutes, args.concurrency, args.burst, args.seed))
    finally:
        if server is not None:
            rc = server.stop(signal.SIGTERM)
            print(f"server exit code after SIGTERM: {rc}")
    print_report(report)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    data = asdict(report)
    data["codes"], data["kinds"] = dict(report.codes), dict(report.kinds)
    args.out.write_text(json.dumps(data, indent=2))
    print(f"wrote {args.out}")
    bad = sum(report.codes[c] for c in BAD)
    return 0 if report.server_alive and bad == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
