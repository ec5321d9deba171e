"""Adapter serving benchmark: output tokens/s with 1, 8, 32 and 64 distinct adapters in the traffic (uniform
and Zipf alpha=1) against base-only, per precision; and LoadAdapter latency p50/p95 per rank and precision.

Every request decodes exactly --max-new-tokens (ignore_eos), so every scenario must produce the same
token count as the base one; a row that does not (failed requests, early stops) is marked REFUSED and has
no ratio: a throughput over different work is no comparison.

Engine-agnostic: it only starts `effllm serve --engine X` and talks gRPC through the project's client.
Adapters are real PEFT adapters on the served base: one made with PEFT per rank, then copies whose weights
get fresh random values (so every adapter is distinct). Prints a table and writes JSON.

    python bench/adapters.py --engine vllm --requests 32            # quick
    python bench/adapters.py --engine hf --precisions fp32,bf16,int4
    python bench/adapters.py --engine hf --precisions fp32 --distinct 1,8 --requests 8 --concurrency 4 \
        --max-new-tokens 4 --ranks 8,16 --load-trials 3             # does it run? (seconds of decoding)
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import re
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from effllm.client.launch import ServerProcess

PROMPTS = (
    "The capital of France is",
    "Write a short poem about the sea.",
    "Explain what a hash table is.",
    "List three uses of copper:",
    "Once upon a time, in a small village,",
    "The best way to learn a language is",
    "def fibonacci(n):",
    "Summer in the mountains means",
)


@dataclass(frozen=True)
class Throughput:
    engine: str
    precision: str
    scenario: str  # base | k adapters, uniform or zipf
    distinct: int
    requests: int
    failed: int
    output_tokens: int
    wall_s: float

    @property
    def tokens_per_s(self) -> float:
        return self.output_tokens / self.wall_s if self.wall_s else 0.0

    def comparable(self, base: Throughput) -> bool:
        """Same work as the base row: no failure and the same number of decoded tokens."""
        return self.failed == 0 and base.failed == 0 and self.output_tokens == base.output_tokens


@dataclass(frozen=True)
class LoadLatency:
    engine: str
    precision: str
    rank: int
    trials: int
    p50_s: float
    p95_s: float
    mean_s: float
    # median ms per load phase, from the server's "loaded adapter ..." log lines (registry.LoadPhases)
    phases_ms: dict[str, float] = field(default_factory=dict)


_LOADED = re.compile(r"loaded adapter (?P<key>\S+) .* in [0-9.]+s: (?P<phases>(\w+=[0-9.]+ms ?)+)$")


def load_phases(log: str, keys: set[str]) -> dict[str, float]:
    """Median milliseconds per phase over the loads of `keys` that the server log reports."""
    spent: dict[str, list[float]] = {}
    for line in log.splitlines():
        m = _LOADED.search(line.rstrip())
        if m is None or m["key"] not in keys:
            continue
        for token in m["phases"].split():
            phase, ms = token.split("=")
            spent.setdefault(phase, []).append(float(ms[: -len("ms")]))
    return {phase: statistics.median(v) for phase, v in spent.items()}


# -- adapters ----------------------------------------------------------------------------------------------
def make_root(where: Path, base: Path, ranks: list[int], copies: dict[int, int]) -> Path:
    """ROOT/r{rank}-{i}/1 for i < copies[rank]: PEFT LoRA on q,v projections, all different weights."""
    import torch
    from peft import LoraConfig, get_peft_model
    from safetensors.torch import load_file, save_file
    from transformers import AutoModelForCausalLM

    root = where / "root"
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    for rank in ranks:
        torch.manual_seed(rank)
        cfg = LoraConfig(
            r=rank,
            lora_alpha=2 * rank,
            target_modules=["q_proj", "v_proj"],
            lora_dropout=0.0,
            init_lora_weights=False,
            task_type="CAUSAL_LM",
        )
        peft = get_peft_model(model, cfg, adapter_name=f"r{rank}")
        first = root / f"r{rank}-0" / "1"
        peft.save_pretrained(str(first.parent / "tmp"), selected_adapters=[f"r{rank}"])
        src = (
            first.parent / "tmp" / f"r{rank}"
            if (first.parent / "tmp" / f"r{rank}").is_dir()
            else first.parent / "tmp"
        )
        shutil.move(str(src), first)
        shutil.rmtree(first.parent / "tmp", ignore_errors=True)
        model = peft.unload()  # type: ignore[assignment]  # back to the plain base for the next rank
        weights = load_file(first / "adapter_model.safetensors")
        for i in range(1, copies[rank]):
            dst = root / f"r{rank}-{i}" / "1"
            dst.mkdir(parents=True)
            shutil.copy(first / "adapter_config.json", dst / "adapter_config.json")
            g = torch.Generator().manual_seed(1000 * rank + i)
            fresh = {k: torch.randn(v.shape, generator=g) * v.std() for k, v in weights.items()}
            save_file(fresh, dst / "adapter_model.safetensors", metadata={"format": "pt"})
    return root


# -- server ------------------------------------------------------------------------------------------------
def serve(args: list[str], logs: Path) -> ServerProcess:
    """A real `effllm serve` on a free port, SERVING when this returns (effllm.client.launch)."""
    from effllm.client.launch import start_server

    return start_server(*args, log_dir=logs, ready_timeout=600.0)


# -- traffic -----------------------------------------------------------------------------------------------
def choose(names: list[str], n: int, dist: str, rng: random.Random) -> list[str]:
    if not names:
        return [""] * n
    weights = [1.0 / (i + 1) for i in range(len(names))] if dist == "zipf" else [1.0] * len(names)
    return rng.choices(names, weights=weights, k=n)


async def drive(target: str, adapters: list[str], concurrency: int, max_new: int) -> tuple[int, int, float]:
    """Closed loop: `concurrency` workers pull requests until the list is empty. (failed, tokens, wall)."""
    from effllm.client import AsyncEffllmClient

    queue = list(enumerate(adapters))
    failed = tokens = 0
    async with AsyncEffllmClient(target, timeout=600.0) as ac:

        async def worker() -> None:
            nonlocal failed, tokens
            while queue:
                i, adapter = queue.pop()
                try:
                    reply = await ac.generate(  # ignore_eos: every scenario decodes the same tokens
                        PROMPTS[i % len(PROMPTS)],
                        adapter=adapter,
                        max_new_tokens=max_new,
                        temperature=0.0,
                        ignore_eos=True,
                    )
                    tokens += reply.usage.output_tokens
                except Exception as exc:  # counted, reported; the benchmark keeps going
                    failed += 1
                    print(f"  request failed: {exc}", file=sys.stderr)

        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        return failed, tokens, time.perf_counter() - t0


def bench_throughput(a: argparse.Namespace, root: Path, precision: str, logs: Path) -> list[Throughput]:
    from effllm.client import EffllmClient

    n_max = max(a.distinct)
    server = serve(
        [
            "--engine",
            a.engine,
            "--precision",
            precision,
            "--adapter-root",
            str(root),
            "--max-adapter-rank",
            "16",
            "--max-adapters-per-batch",
            str(a.per_batch),
            "--max-adapters-resident",
            str(n_max + 4),
            "--max-concurrency",
            str(a.concurrency),
            "--kv-cache-gib",
            str(a.kv_cache_gib),
            "--max-context",
            "512",
            *a.server_arg,
        ],
        logs,
    )
    out = []
    try:
        with EffllmClient(server.target, timeout=300.0) as c:
            names = [f"r8-{i}" for i in range(n_max)]
            for name in names:
                c.load_adapter(name, "1")
        rng = random.Random(0)
        asyncio.run(
            drive(
                server.target,
                choose(names[:1], a.concurrency, "uniform", rng),
                a.concurrency,
                a.max_new_tokens,
            )
        )  # warm-up
        scenarios = [("base", 0, "uniform")] + [
            (f"{k} {dist}", k, dist) for k in a.distinct for dist in (("uniform",) if k == 1 else a.dists)
        ]
        for label, k, dist in scenarios:
            traffic = choose(names[:k], a.requests, dist, rng)
            failed, tokens, wall = asyncio.run(drive(server.target, traffic, a.concurrency, a.max_new_tokens))
            row = Throughput(a.engine, precision, label, k, a.requests, failed, tokens, wall)
            print(
                f"  {precision} {label:>12}: {row.tokens_per_s:8.1f} tok/s ({tokens} tokens, {wall:.1f}s, "
                f"{failed} failed)",
                flush=True,
            )
            out.append(row)
    finally:
        server.stop()
    return out


def bench_load(a: argparse.Namespace, root: Path, precision: str, logs: Path) -> list[LoadLatency]:
    from effllm.client import EffllmClient

    server = serve(
        [
            "--engine",
            a.engine,
            "--precision",
            precision,
            "--adapter-root",
            str(root),
            "--max-adapter-rank",
            str(max(a.ranks)),
            "--max-adapters-per-batch",
            "2",
            "--max-adapters-resident",
            "4",
            "--kv-cache-gib",
            str(a.kv_cache_gib),
            "--max-context",
            "512",
            *a.server_arg,
        ],
        logs,
    )
    out = []
    try:
        with EffllmClient(server.target, timeout=300.0) as c:
            for rank in a.ranks:
                times = []
                for i in range(a.load_trials):
                    t0 = time.perf_counter()
                    c.load_adapter(f"r{rank}-{i}", "1")
                    times.append(time.perf_counter() - t0)
                    c.unload_adapter(f"r{rank}-{i}", "1")
                times.sort()
                p95 = times[min(len(times) - 1, round(0.95 * (len(times) - 1)))]
                keys = {f"r{rank}-{i}@1" for i in range(a.load_trials)}
                row = LoadLatency(
                    a.engine,
                    precision,
                    rank,
                    len(times),
                    statistics.median(times),
                    p95,
                    statistics.fmean(times),
                    load_phases(server.log(), keys),
                )
                phases = ", ".join(f"{k} {v:.1f}" for k, v in row.phases_ms.items())
                print(
                    f"  {precision} load r={rank}: p50 {row.p50_s * 1e3:.1f} ms, "
                    f"p95 {row.p95_s * 1e3:.1f} ms; median ms per phase: {phases or 'not in the log'}",
                    flush=True,
                )
                out.append(row)
    finally:
        server.stop()
    return out


def table(tput: list[Throughput], loads: list[LoadLatency]) -> str:
    lines = [
        "| engine | precision | traffic | distinct | requests | failed | tokens/s | vs base |",
        "|---|---|---|---:|---:|---:|---:|---:|",
    ]
    for r in tput:
        base = next(b for b in tput if b.precision == r.precision and b.distinct == 0)
        ratio = f"{r.tokens_per_s / base.tokens_per_s:.2f}" if r.comparable(base) else "REFUSED"
        lines.append(
            f"| {r.engine} | {r.precision} | {r.scenario} | {r.distinct} | {r.requests} | {r.failed} | "
            f"{r.tokens_per_s:.1f} | {ratio} |"
        )
    lines += [
        "",
        "| engine | precision | rank | trials | load p50 ms | load p95 ms | median ms per phase (server) |",
        "|---|---|---:|---:|---:|---:|---|",
    ]
    for q in loads:
        phases = ", ".join(f"{k} {v:.1f}" for k, v in q.phases_ms.items()) or "-"
        lines.append(
            f"| {q.engine} | {q.precision} | {q.rank} | {q.trials} | {q.p50_s * 1e3:.1f} | "
            f"{q.p95_s * 1e3:.1f} | {phases} |"
        )
    return "\n".join(lines)


def cpu_model() -> str:
    from effllm.telemetry.machine import machine

    return machine().cpu_model


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--engine", default="vllm", help="passed to `effllm serve --engine` (vllm, hf, ...)")
    p.add_argument("--precisions", default="fp32,bf16")
    p.add_argument("--distinct", default="1,8,32,64", help="distinct adapters in the traffic")
    p.add_argument("--dists", default="uniform,zipf", help="popularity of k > 1 adapters: uniform, zipf")
    p.add_argument("--requests", type=int, default=128, help="requests per scenario")
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--per-batch", type=int, default=8, help="--max-adapters-per-batch of the server")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--ranks", default="8,16,64")
    p.add_argument("--load-trials", type=int, default=20, help="0 skips the load-latency part")
    p.add_argument("--kv-cache-gib", type=float, default=0.25)
    p.add_argument("--server-arg", action="append", default=[], help="extra `effllm serve` flag (repeatable)")
    p.add_argument("--model", default=None, help="base checkpoint dir (default: the embedded default model)")
    p.add_argument(
        "--out", type=Path, default=None, help="JSON path (default runs/bench-adapters-ENGINE.json)"
    )
    a = p.parse_args()
    a.precisions = a.precisions.split(",")
    a.distinct = [int(x) for x in a.distinct.split(",")]
    a.dists = tuple(d for d in a.dists.split(",") if d)
    if not a.dists or set(a.dists) - {"uniform", "zipf"}:
        p.error(f"--dists {','.join(a.dists)!r}: each of uniform, zipf")
    load_before = os.getloadavg()
    a.ranks = [int(x) for x in a.ranks.split(",")]
    out = a.out or Path("runs") / f"bench-adapters-{a.engine}.json"
    out.parent.mkdir(parents=True, exist_ok=True)

    from effllm.common.model import resolve_model

    model = resolve_model(a.model)
    if a.model:
        a.server_arg += ["--model", str(model.path)]
    work = Path(tempfile.mkdtemp(prefix="bench-adapters-"))
    try:
        copies = {r: max(a.load_trials, 1) for r in a.ranks}
        copies[8] = max(copies.get(8, 0), max(a.distinct))
        t0 = time.perf_counter()
        root = make_root(work, model.path, sorted(set(a.ranks) | {8}), copies)
        print(
            f"made {sum(copies.values())} adapters in {time.perf_counter() - t0:.1f}s under {root}",
            flush=True,
        )
        tput: list[Throughput] = []
        for precision in a.precisions:
            tput += bench_throughput(a, root, precision, work)
        loads = [
            row
            for precision in (a.precisions if a.load_trials > 0 else [])
            for row in bench_load(a, root, precision, work)
        ]
    finally:
        for log in work.glob("*.log"):
            shutil.copy(log, out.parent / f"{out.stem}-{log.name}")
        shutil.rmtree(work, ignore_errors=True)
    report = {
        "engine": a.engine,
        "model": model.name,
        "cpu_count": os.cpu_count(),
        "cpu_model": cpu_model(),
        "loadavg_start": load_before,
        "loadavg_end": os.getloadavg(),
        "config": {k: v for k, v in vars(a).items() if k != "out"},
        "throughput": [
            {
                **asdict(r),
                "tokens_per_s": r.tokens_per_s,
                "vs_base": (r.tokens_per_s / base.tokens_per_s) if r.comparable(base) else None,
                "refused": not r.comparable(base),
            }
            for r in tput
            for base in [next(b for b in tput if b.precision == r.precision and b.distinct == 0)]
        ],
        "load_latency": [asdict(r) for r in loads],
    }
    out.write_text(json.dumps(report, indent=2, default=str))
    print(
        f"CPU {report['cpu_model']}, {os.cpu_count()} cores; load average {load_before} -> {os.getloadavg()}"
    )
    print(table(tput, loads))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
