"""Bounded soak on loopback: a real `effllm serve` under a mixed load for N minutes, then stop.

The mix: streamed and unary generations (1-16 new tokens), invalid requests, streams the client abandons
after the first chunk, calls with a deadline too short to finish, and bursts past the queue. With
`--adapters N` (the default when the script starts its own server) N synthetic adapters (LoRA/rsLoRA, rank
8/16) are loaded first and each generation names one of them with Zipf popularity (or the base model, a
`--base-share` of the time); every `--churn-s` seconds a further adapter `churn` gets a new version and its
old one is unloaded while requests name it, and a deliberately bad adapter (NaN alpha) is offered and must
be refused. Reports requests served, errors by status code, and the RSS of the server's process tree over
time, with its spread from minute 2 to the end; prints a table and writes JSON. Exit code 1 if anything
answered UNKNOWN/INTERNAL, a good request failed, or the server died.

    python scripts/soak.py --minutes 3 --out runs/soak.json
    python scripts/soak.py --minutes 10 --adapters 24 --out runs/soak-zipf.json
    python scripts/soak.py --target 127.0.0.1:50051 --pid 1234 --minutes 10 --adapters 0  # existing server
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
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
    adapters: int = 0
    adapter_requests: Counter[str] = field(default_factory=Counter)  # by adapter name ("" = base)
    churn_versions: int = 0
    bad_adapter_refusals: Counter[str] = field(default_factory=Counter)
    rss_spread_from_2min: float | None = None  # (max - min) / RSS at minute 2, over t >= 120 s


@dataclass
class Traffic:
    """Which adapter a generation names: Zipf over `names` (weight 1/(i+1)^s), or the base model."""

    names: list[str]
    base_share: float
    zipf_s: float = 1.1
    churn: bool = False  # also name "churn" (re-versioned while the soak runs)

    def pick(self, rng: random.Random) -> str:
        if not self.names or rng.random() < self.base_share:
            return ""
        if self.churn and rng.random() < 0.05:
            return "churn"
        weights = [1.0 / (i + 1) ** self.zipf_s for i in range(len(self.names))]
        return rng.choices(self.names, weights)[0]


def tree_rss(pid: int) -> float:
    proc = psutil.Process(pid)
    total = 0
    for p in [proc, *proc.children(recursive=True)]:
        with contextlib.suppress(psutil.Error):
            total += p.memory_info().rss
    return total / (1 << 20)


async def one(client: AsyncEffllmClient, rng: random.Random, report: Report, traffic: Traffic) -> None:
    kind = rng.choices(["stream", "unary", "invalid", "abandon", "deadline"], [45, 20, 15, 10, 10])[0]
    prompt = rng.choice(PROMPTS)
    n = rng.randint(1, 16)
    adapter = traffic.pick(rng)
    code = "OK"
    try:
        if kind == "stream":
            report.adapter_requests[adapter] += 1
            async for chunk in client.stream(prompt, max_new_tokens=n, adapter=adapter):
                if chunk.HasField("final"):
                    report.output_tokens += chunk.final.usage.output_tokens
        elif kind == "unary":
            report.adapter_requests[adapter] += 1
            reply = await client.generate(prompt, max_new_tokens=n, adapter=adapter)
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
    if kind in ("stream", "unary") and code not in ("OK", "RESOURCE_EXHAUSTED"):
        report.codes[f"FAILED_GOOD:{code}"] += 1  # a well-formed request on a loaded adapter must not fail
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


async def churn(client: AsyncEffllmClient, root: Path, period_s: float, end: float, report: Report) -> None:
    """Every period: publish churn@k+1 (fresh weights), load it, unload churn@k; offer the NaN adapter."""
    from effllm.tuner.synthetic import clone_adapter

    template = root / "m0" / "1"
    version = 1
    while time.monotonic() + period_s < end:
        await asyncio.sleep(period_s)
        version += 1
        await asyncio.to_thread(clone_adapter, template, root / "churn" / str(version), seed=version)
        await client.load_adapter("churn", str(version))
        await client.unload_adapter("churn", str(version - 1), wait_s=30)
        report.churn_versions += 1
        try:
            await client.load_adapter("poison", "1")
            report.bad_adapter_refusals["LOADED(!)"] += 1
        except grpc.RpcError as err:
            report.bad_adapter_refusals[err.code().name] += 1


def make_adapters(root: Path, count: int) -> list[str]:
    """`count` distinct adapters m0.. plus churn@1 and a poisoned copy (lora_alpha NaN) under root."""
    from effllm.common.model import resolve_model
    from effllm.tuner.synthetic import clone_adapter, make_many_adapters

    made = make_many_adapters(resolve_model(None).path, root, count)
    clone_adapter(root / "m0" / "1", root / "churn" / "1", seed=1)
    poison = clone_adapter(root / "m0" / "1", root / "poison" / "1", seed=2)
    text = (poison / "adapter_config.json").read_text()
    cfg = json.loads(text)
    cfg.pop("lora_alpha", None)
    (poison / "adapter_config.json").write_text(json.dumps(cfg)[:-1] + ', "lora_alpha": NaN}')
    return [name for name, _, _ in made]


def rss_spread(samples: list[tuple[float, float, int, int]], from_s: float = 120.0) -> float | None:
    window = [rss for t, rss, _, _ in samples if t >= from_s and rss > 0]
    if len(window) < 2:
        return None
    return (max(window) - min(window)) / window[0]


async def soak(
    target: str,
    pid: int | None,
    minutes: float,
    concurrency: int,
    burst_size: int,
    seed: int,
    adapter_root: Path | None = None,
    names: list[str] | None = None,
    base_share: float = 0.2,
    churn_s: float = 30.0,
) -> Report:
    report = Report(minutes, concurrency)
    names = names or []
    async with AsyncEffllmClient(target, timeout=60) as client:
        for name in [*names, *(["churn"] if adapter_root else [])]:
            await client.load_adapter(name, "1")
        report.adapters = len(names)
        traffic = Traffic(names, base_share, churn=adapter_root is not None)
        end = time.monotonic() + minutes * 60
        t0 = time.monotonic()

        async def worker(i: int) -> None:
            rng = random.Random(seed * 1000 + i)
            while time.monotonic() < end:
                await one(client, rng, report, traffic)

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

        extra = [churn(client, adapter_root, churn_s, end, report)] if adapter_root else []
        await asyncio.gather(sampler(), *extra, *(worker(i) for i in range(concurrency)))
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
    report.rss_spread_from_2min = rss_spread(report.rss_mib)
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
    if r.adapters:
        top = sorted(r.adapter_requests.items(), key=lambda kv: -kv[1])[:6]
        print(f"{'adapters (Zipf)':<28}{r.adapters}; top requests {[(k or 'base', n) for k, n in top]}")
        print(f"{'churn versions':<28}{r.churn_versions}; bad adapter offers: {dict(r.bad_adapter_refusals)}")
    if r.rss_spread_from_2min is not None:
        print(f"{'RSS spread from minute 2':<28}{100 * r.rss_spread_from_2min:.1f} % (target <= 5 %)")
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
        "--adapters", type=int, default=None, help="Zipf adapters (24 with a server started here, else 0)"
    )
    ap.add_argument("--base-share", type=float, default=0.2, help="share of generations on the base model")
    ap.add_argument("--churn-s", type=float, default=30.0, help="seconds between churn re-versions")
    ap.add_argument(
        "--serve-args",
        default="--engine vllm --kv-cache-gib 0.25 --max-context 512 --max-concurrency 4 --queue-size 8",
        help="flags for the server started here",
    )
    args = ap.parse_args()
    server = None
    target, pid = args.target, args.pid
    count = args.adapters if args.adapters is not None else (24 if target is None else 0)
    root, names = None, []
    if target is None:
        import tempfile

        from effllm.client.launch import start_server

        args.out.parent.mkdir(parents=True, exist_ok=True)
        serve_args = args.serve_args.split()
        if count:
            root = Path(tempfile.mkdtemp(prefix="effllm-soak-adapters-"))
            names = make_adapters(root, count)
            serve_args += [
                "--adapter-root",
                str(root),
                "--max-adapters-resident",
                str(count + 2),
                "--max-adapter-rank",
                "16",
            ]
        server = start_server(*serve_args, log_dir=args.out.parent, ready_timeout=900)
        target, pid = server.target, server.proc.pid
        print(f"server {target} pid {pid} (log {server.log_path}); {count} adapters")
    try:
        report = asyncio.run(
            soak(
                target,
                pid,
                args.minutes,
                args.concurrency,
                args.burst,
                args.seed,
                root,
                names,
                args.base_share,
                args.churn_s,
            )
        )
    finally:
        if server is not None:
            rc = server.stop(signal.SIGTERM)
            print(f"server exit code after SIGTERM: {rc}")
    print_report(report)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    data = asdict(report)
    data["codes"], data["kinds"] = dict(report.codes), dict(report.kinds)
    data["adapter_requests"] = dict(report.adapter_requests)
    data["bad_adapter_refusals"] = dict(report.bad_adapter_refusals)
    from effllm.telemetry.machine import machine

    data["cpu"] = machine().cpu_model
    data["loadavg_end"] = os.getloadavg()
    args.out.write_text(json.dumps(data, indent=2))
    print(f"wrote {args.out}")
    bad = sum(report.codes[c] for c in BAD)
    bad += sum(n for c, n in report.codes.items() if c.startswith("FAILED_GOOD:"))
    bad += report.bad_adapter_refusals.get("LOADED(!)", 0)
    return 0 if report.server_alive and bad == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
