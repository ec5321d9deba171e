"""Compiled vs eager decode under CPU contention (issue 27 item 7): the hf engine's time per token, eager and
`compile_decode`, side by side in one process (same model, same prompt, same tokens, alternating), without
and with busy-loop processes (`python -c 'while True: pass'`) that this script starts and kills. Prints a
table (CPU model, load average) and writes JSON.

Each variant runs in its own child process, because OpenMP reads its environment (OMP_WAIT_POLICY,
GOMP_SPINCOUNT) once, when torch loads libgomp:
  - default:     the engine as shipped
  - omp-threads: inductor's C++ kernels with `#pragma omp parallel num_threads(torch.get_num_threads())`,
                 as before the fix (HfConfig.compile_threads=0)
  - passive:     as omp-threads, with OMP_WAIT_POLICY=PASSIVE (a waiting OpenMP thread sleeps, no spin)

One batch bucket (max_concurrency 1) keeps each compile to one graph (~40 s on SmolLM2-135M).

    python bench/contention.py --tokens 24 --busy 1 --variants default omp-threads passive
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
from typing import Any

VARIANTS: dict[str, tuple[dict[str, str], int | None]] = {  # name -> (environment, compile_threads)
    "default": ({}, None),
    "omp-threads": ({}, 0),
    "passive": ({"OMP_WAIT_POLICY": "PASSIVE"}, 0),
}


def machine() -> dict[str, Any]:
    sys.path.insert(0, str(Path(__file__).parent))
    from serving import machine as serving_machine  # lscpu's model and flags, CPU count, load average

    return serving_machine()


# --- child: one variant, both engines in this process ------------------------------------------------------
async def child(args: argparse.Namespace) -> dict[str, Any]:
    from effllm.common.model import resolve_model
    from effllm.server.engines.base import GenerationRequest, Sampling
    from effllm.server.engines.hf_engine import HfConfig, HfEngine

    model = resolve_model(args.model)
    common: dict[str, Any] = {"precision": args.precision, "max_concurrency": 1, "max_context": 256}
    if args.compile_threads is not None:
        common["compile_threads"] = args.compile_threads
    engines = {"eager": HfEngine(model, HfConfig(**common))}
    engines["compiled"] = HfEngine(model, HfConfig(**common, compile_decode=True))
    t0 = time.perf_counter()
    for eng in engines.values():
        await eng.start()
    start_s = time.perf_counter() - t0

    async def per_token(eng: HfEngine, tag: str) -> float:
        req = GenerationRequest(
            request_id=tag,
            prompt="The three primary colors are",
            sampling=Sampling(max_new_tokens=args.tokens, temperature=0.0, ignore_eos=True),
        )
        stamps = [time.perf_counter() async for _ in eng.generate(req)]
        return (stamps[-1] - stamps[0]) / (len(stamps) - 1)  # decode steps only: the prefill is left out

    out: dict[str, Any] = {"start_s": start_s, "conditions": {}}
    for busy in sorted({0, args.busy}):
        procs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(busy)]
        try:
            await asyncio.sleep(0.5)
            times: dict[str, list[float]] = {name: [] for name in engines}
            for i in range(args.rounds):  # alternate, so drifting load hits both sides alike
                order = list(engines) if i % 2 == 0 else list(reversed(engines))
                for name in order:
                    times[name].append(await per_token(engines[name], f"{name}-{busy}-{i}"))
            info = engines["compiled"].info.extra
            out["conditions"][str(busy)] = {
                "s_per_token": {k: sorted(v)[len(v) // 2] for k, v in times.items()},
                "all": times,
                "load_avg": os.getloadavg(),
                "decode": info.get("decode"),
            }
        finally:
            for p in procs:
                p.kill()
                p.wait()
    for eng in engines.values():
        await eng.shutdown()
    return out


# --- driver --------------------------------------------------------------------------------------------
def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="default: the project's default model (SmolLM2-135M)")
    ap.add_argument("--precision", default="fp32")
    ap.add_argument("--tokens", type=int, default=24, help="new tokens per request")
    ap.add_argument("--rounds", type=int, default=3, help="requests per engine and condition (median)")
    ap.add_argument("--busy", type=int, default=1, help="busy-loop processes in the contended condition")
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    ap.add_argument("--out", type=Path, default=Path("runs/bench-contention.json"))
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--compile-threads", type=int, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(asyncio.run(child(args))))
        return 0

    info = machine()
    results: dict[str, Any] = {}
    for name in args.variants:
        env, threads = VARIANTS[name]
        cmd = [sys.executable, __file__, "--child", "--precision", args.precision]
        cmd += ["--tokens", str(args.tokens), "--rounds", str(args.rounds), "--busy", str(args.busy)]
        cmd += ["--model", args.model] if args.model else []
        cmd += ["--compile-threads", str(threads)] if threads is not None else []
        run = subprocess.run(cmd, env={**os.environ, **env}, capture_output=True, text=True)
        if run.returncode != 0:
            print(run.stderr[-3000:], file=sys.stderr)
            return run.returncode
        results[name] = json.loads(run.stdout.strip().splitlines()[-1])
    info["load_avg_end"] = os.getloadavg()
    print(
        f"# {info['cpu_model']} {info.get('cpu_flags', [])}, {info['cpu_count']} CPUs; "
        f"load avg {info['load_avg'][0]:.2f} -> {info['load_avg_end'][0]:.2f}; "
        f"{args.tokens} tokens, median of {args.rounds}"
    )
    head = f"{'variant':<12} {'busy':>4} {'eager s/tok':>12} {'compiled s/tok':>15} {'ratio':>6}"
    print(f"{head} {'decode':>9}")
    for name, res in results.items():
        for busy, cond in res["conditions"].items():
            e, c = cond["s_per_token"]["eager"], cond["s_per_token"]["compiled"]
            print(f"{name:<12} {busy:>4} {e:>12.4f} {c:>15.4f} {c / e:>6.2f} {cond['decode']!s:>9}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"machine": info, "args": vars(args) | {"out": str(args.out)}, **results}))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
