"""Serving benchmark: N concurrent gRPC streams through effllm vs vLLM's own offline `LLM.generate`.

Same model, prompts, dtype, greedy decoding and machine, in one run. For each dtype the offline run
goes first in a child process (so both never hold memory at once), then our server is started and driven
by `concurrency` closed-loop streaming clients. Prints output tokens/s for both and the ratio; writes JSON.

    python bench/serving.py --dtypes fp32 bf16 --concurrency 1 8 32 --out runs/bench-serving.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import time
from pathlib import Path

TOPICS = [
    "a lighthouse keeper",
    "the history of tea",
    "a robot learning to paint",
    "winter in Oslo",
    "how bridges are built",
    "a lost library",
    "the life of a honeybee",
    "an old sailing ship",
]
VLLM_DTYPE = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


def prompts(n: int) -> list[str]:
    return [f"Write a long, detailed story about {TOPICS[i % len(TOPICS)]} (part {i})." for i in range(n)]


def n_requests(concurrency: int, per_level: int) -> int:
    return max(per_level, 2 * concurrency)


def offline(model: str, dtype: str, levels: list[int], per_level: int, max_new: int, kv_gib: float) -> dict:
    """vLLM offline: for concurrency c, the prompts go through generate() in batches of c."""
    from vllm import LLM, SamplingParams

    llm = LLM(
        model=model,
        dtype=VLLM_DTYPE[dtype],
        max_model_len=1024,
        max_num_seqs=max(levels),
        kv_cache_memory_bytes=int(kv_gib * (1 << 30)),
        enforce_eager=True,
        seed=0,
    )
    params = SamplingParams(max_tokens=max_new, temperature=0.0)
    llm.generate(prompts(2), params, use_tqdm=False)  # warm-up
    out = {}
    for c in levels:
        ps = prompts(n_requests(c, per_level))
        t0 = time.perf_counter()
        tokens = 0
        for i in range(0, len(ps), c):
            for r in llm.generate(ps[i : i + c], params, use_tqdm=False):
                tokens += len(r.outputs[0].token_ids)
        out[str(c)] = {"tokens": tokens, "seconds": time.perf_counter() - t0}
    return out


async def drive(target: str, c: int, n: int, max_new: int) -> dict:
    from effllm.client import AsyncEffllmClient

    queue: asyncio.Queue[str] = asyncio.Queue()
    for p in prompts(n):
        queue.put_nowait(p)
    tokens = 0
    ttfts: list[float] = []

    async def worker(client: AsyncEffllmClient) -> None:
        nonlocal tokens
        while not queue.empty():
            prompt = queue.get_nowait()
            async for ch in client.stream(prompt, max_new_tokens=max_new, temperature=0.0):
                if ch.HasField("final"):
                    tokens += ch.final.usage.output_tokens
                    ttfts.append(ch.final.timings.time_to_first_token_s)

    async with AsyncEffllmClient(target, timeout=600) as client:
        await client.generate(prompts(1)[0], max_new_tokens=4)  # warm-up
        t0 = time.perf_counter()
        await asyncio.gather(*(worker(client) for _ in range(c)))
        seconds = time.perf_counter() - t0
    ttfts.sort()
    return {"tokens": tokens, "seconds": seconds, "ttft_p50_s": ttfts[len(ttfts) // 2]}


def ours(
    dtype: str,
    levels: list[int],
    per_level: int,
    max_new: int,
    kv_gib: float,
    extra: list[str],
    log_dir: Path,
) -> dict:
    from effllm.client.launch import start_server

    server = start_server(
        "--engine",
        "vllm",
        "--precision",
        dtype,
        "--max-concurrency",
        str(max(levels)),
        "--max-context",
        "1024",
        "--kv-cache-gib",
        str(kv_gib),
        *extra,
        log_dir=log_dir,
    )
    try:
        return {
            str(c): asyncio.run(drive(server.target, c, n_requests(c, per_level), max_new)) for c in levels
        }
    finally:
        server.stop()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dtypes", nargs="+", default=["fp32", "bf16"], choices=list(VLLM_DTYPE))
    ap.add_argument("--concurrency", nargs="+", type=int, default=[1, 8, 32])
    ap.add_argument("--requests", type=int, default=8, help="requests per level (at least 2 x concurrency)")
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--kv-cache-gib", type=float, default=1.0)
    ap.add_argument("--server-arg", action="append", default=[], help="extra `effllm serve` flag (repeat)")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="OMP threads, both sides")
    ap.add_argument("--out", default="runs/bench-serving.json")
    ap.add_argument("--_offline", help=argparse.SUPPRESS)
    args = ap.parse_args()

    if args._offline:  # child mode: print the offline result as JSON
        from effllm.common.model import resolve_model

        res = offline(
            str(resolve_model(None).path),
            args._offline,
            args.concurrency,
            args.requests,
            args.max_new_tokens,
            args.kv_cache_gib,
        )
        print("RESULT " + json.dumps(res))
        return

    # Both sides get the same OpenMP thread count (the launcher alone would default the server to 1).
    os.environ["OMP_NUM_THREADS"] = str(args.threads)
    out_path = Path(args.out)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    rows = []
    for dtype in args.dtypes:
        cmd = [
            sys.executable,
            __file__,
            "--_offline",
            dtype,
            "--concurrency",
            *map(str, args.concurrency),
            "--requests",
            str(args.requests),
            "--max-new-tokens",
            str(args.max_new_tokens),
            "--kv-cache-gib",
            str(args.kv_cache_gib),
        ]
        proc = subprocess.run(
            cmd, capture_output=True, text=True, env={**os.environ, "VLLM_LOGGING_LEVEL": "WARNING"}
        )
        line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
        if line is None:
            sys.exit(f"offline vLLM run failed:\n{proc.stderr[-3000:]}")
        off = json.loads(line[7:])
        mine = ours(
            dtype,
            args.concurrency,
            args.requests,
            args.max_new_tokens,
            args.kv_cache_gib,
            args.server_arg,
            out_path.parent,
        )
        for c in args.concurrency:
            o, m = off[str(c)], mine[str(c)]
            o_tps, m_tps = o["tokens"] / o["seconds"], m["tokens"] / m["seconds"]
            rows.append(
                {
                    "dtype": dtype,
                    "concurrency": c,
                    "requests": n_requests(c, args.requests),
                    "vllm_offline_tok_s": o_tps,
                    "effllm_grpc_tok_s": m_tps,
                    "ratio": m_tps / o_tps,
                    "vllm_offline_tokens": o["tokens"],
                    "effllm_tokens": m["tokens"],
                    "effllm_ttft_p50_s": m["ttft_p50_s"],
                }
            )

    print(
        f"{'dtype':6} {'conc':>5} {'reqs':>5} {'vLLM offline tok/s':>19} "
        f"{'effllm gRPC tok/s':>18} {'ratio':>6} {'TTFT p50':>9}"
    )
    for r in rows:
        print(
            f"{r['dtype']:6} {r['concurrency']:>5} {r['requests']:>5} {r['vllm_offline_tok_s']:>19.1f} "
            f"{r['effllm_grpc_tok_s']:>18.1f} {r['ratio']:>6.2f} {r['effllm_ttft_p50_s'] * 1e3:>7.0f}ms"
        )
    meta = {"max_new_tokens": args.max_new_tokens, "cpu_count": os.cpu_count(), "time": time.time()}
    out_path.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    print(f"wrote {out_path}")


if __name__ == "__main__":
    main()
