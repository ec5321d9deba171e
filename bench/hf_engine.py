"""hf engine benchmark: output tokens/s at fp32 / bf16 / int4, 1 and 8 concurrent requests, base vs 4 mixed
adapters, driven in-process (no gRPC) so the numbers are the engine's own. Also the measured weight bytes
of each precision and their ratio to bf16. Prints a table; writes JSON.

    python bench/hf_engine.py --precisions fp32 bf16 int4 --concurrency 1 8 --max-new 32 \
        --out runs/bench-hf-engine.json

The 4 adapters are real PEFT adapters on the base (effllm.tuner.synthetic): lora, rslora, lora, and dora where
the precision serves it (a DoRA adapter runs as its own batch group: one more forward per step), else rslora.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from _harness import header, machine_record, write_report
from serving import TOPICS  # bench/serving.py, beside this script: the same prompts


def make_adapters(base: Path, root: Path) -> dict[str, Any]:
    from effllm.server.engines.base import AdapterSpec
    from effllm.tuner.synthetic import make_adapter

    specs = {}
    for i, method in enumerate(("lora", "rslora", "lora", "dora", "rslora")):
        name = f"{method}{i}"
        path = make_adapter(base, root / name / "1", method=method, rank=8, seed=i, scale=0.3)
        specs[name] = AdapterSpec(name, "1", path, method, 8, 16.0, ("q_proj", "v_proj"))  # type: ignore[arg-type]
    return specs


async def run_level(engine: Any, c: int, adapters: list[Any], n: int, max_new: int) -> dict[str, float]:
    """`n` requests through `c` closed-loop clients; request i runs on adapters[i % len] (or the base)."""
    from effllm.server.engines.base import ChatTurn, GenerationRequest, Sampling

    queue: asyncio.Queue[int] = asyncio.Queue()
    for i in range(n):
        queue.put_nowait(i)
    tokens = 0

    async def client() -> None:
        nonlocal tokens
        while not queue.empty():
            i = queue.get_nowait()
            spec = adapters[i % len(adapters)] if adapters else None
            req = GenerationRequest(
                f"b{c}-{i}-{time.monotonic_ns()}",
                Sampling(max_new_tokens=max_new, temperature=0.0),
                messages=(
                    ChatTurn("user", f"Write a long, detailed story about {TOPICS[i % len(TOPICS)]}."),
                ),
                adapter=spec.key if spec else "",
                resolved_adapter=spec,
            )
            async for event in engine.generate(req):
                tokens += len(event.token_ids)

    t0 = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(c)))
    seconds = time.perf_counter() - t0
    return {"tokens": tokens, "seconds": seconds, "tokens_per_s": tokens / seconds}


async def bench_precision(precision: str, specs: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    from effllm.common.model import resolve_model
    from effllm.server.engines.hf_engine import HfConfig, HfEngine

    engine = HfEngine(
        resolve_model(None),
        HfConfig(precision=precision, max_concurrency=max(args.concurrency), max_context=1024),
    )  # type: ignore[arg-type]
    t0 = time.perf_counter()
    await engine.start()
    load_s = time.perf_counter() - t0
    served = [s for s in specs.values() if s.method in engine.info.adapter_methods]
    mixed = [s for s in served if s.method != "dora"][:3] + [s for s in served if s.method == "dora"][:1]
    if len(mixed) < 4:
        mixed = served[:4]
    for spec in mixed:
        await engine.add_adapter(spec)
    await run_level(engine, 1, [], 1, 4)  # warm-up
    out: dict[str, Any] = {
        "weight_bytes": engine.info.weight_bytes,
        "ratio_to_bf16": engine.info.weight_ratio_to_bf16,
        "load_s": load_s,
        "adapters": [s.method for s in mixed],
        "levels": {},
    }
    for c in args.concurrency:
        n = max(args.requests, c)
        for mode, adapters in (("base", []), ("4 adapters", mixed)):
            r = await run_level(engine, c, adapters, n, args.max_new)
            out["levels"][f"{c}/{mode}"] = r
            print(f"  {precision} c={c} {mode}: {r['tokens_per_s']:.1f} tok/s", flush=True)
    await engine.shutdown()
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--precisions", nargs="+", default=["fp32", "bf16", "int4"])
    p.add_argument("--concurrency", nargs="+", type=int, default=[1, 8])
    p.add_argument("--requests", type=int, default=2, help="requests per level (at least c)")
    p.add_argument("--max-new", type=int, default=32)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--out", default="runs/bench-hf-engine.json")
    args = p.parse_args()
    record = machine_record()

    import torch

    from effllm.common.model import resolve_model

    if args.threads:
        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        specs = make_adapters(resolve_model(None).path, Path(tmp))
        results = {pr: asyncio.run(bench_precision(pr, specs, args)) for pr in args.precisions}

    levels = [f"{c}/{m}" for c in args.concurrency for m in ("base", "4 adapters")]
    out = Path(args.out)
    write_report(out, {"args": vars(args), "threads": torch.get_num_threads(), "results": results}, record)
    print(
        f"\nhf engine, output tokens/s (max_new_tokens {args.max_new}, greedy, torch threads "
        f"{torch.get_num_threads()})\n{header(record)}"
    )
    print("| precision | weight MB | ratio to bf16 | " + " | ".join(f"c={lv}" for lv in levels) + " |")
    print("|---|---|---|" + "---|" * len(levels))
    for pr, r in results.items():
        cells = " | ".join(f"{r['levels'][lv]['tokens_per_s']:.1f}" for lv in levels)
        print(f"| {pr} | {r['weight_bytes'] / 1e6:.1f} | {r['ratio_to_bf16']:.4f} | {cells} |")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
