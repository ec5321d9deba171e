"""Compiled vs eager decode under CPU contention (issue 27 item 7): the hf engine's time per token, eager and
`compile_decode`, side by side in one process (same model, same prompt, same tokens, alternating), without
and with busy-loop processes (`python -c 'while True: pass'`) that this script starts and kills. Prints a
table (CPU model, load average) and writes JSON.

First, the cause on its own ("kernel" table): one inductor C++ kernel over 4 x 1536 floats (a batch-4 SiLU
x up, the size of kernel that inductor parallelises at 2 threads), compiled single-threaded and with
`#pragma omp parallel` over torch's threads, against the same ops eagerly, in microseconds per call.
Under contention a parallel region waits until every one of its threads has had a time slice.

Then the engine ("engine" table). Each variant runs in its own child process, because OpenMP reads its
environment (OMP_WAIT_POLICY, GOMP_SPINCOUNT) once, when torch loads libgomp:
  - shipped:     the engine as shipped (single-threaded kernels, StepWatch on: it may fall back to eager)
  - threads1:    single-threaded kernels, StepWatch off (what the compiled step costs)
  - omp-threads: kernels on torch's threads, as before the fix (HfConfig.compile_threads=0), watch off
  - passive:     as omp-threads, with OMP_WAIT_POLICY=PASSIVE (a waiting OpenMP thread sleeps at once)

One batch bucket (max_concurrency 1) keeps each compile to one graph (~40 s on SmolLM2-135M).

    python bench/contention.py --tokens 24 --busy 1 --variants shipped threads1 omp-threads passive
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

# name -> (environment, HfConfig.compile_threads, StepWatch on)
VARIANTS: dict[str, tuple[dict[str, str], int, bool]] = {
    "shipped": ({}, 1, True),
    "threads1": ({}, 1, False),
    "omp-threads": ({}, 0, False),
    "passive": ({"OMP_WAIT_POLICY": "PASSIVE"}, 0, False),
}


def busy_loops(n: int) -> list[subprocess.Popen[bytes]]:
    procs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(n)]
    time.sleep(0.5)
    return procs


def stop(procs: list[subprocess.Popen[bytes]]) -> None:
    for p in procs:
        p.kill()
        p.wait()


# --- child: the cause alone, one kernel -------------------------------------------------------------------
def silu_mul_1(x: Any, y: Any) -> Any:
    import torch

    return torch.nn.functional.silu(x) * y


def silu_mul_2(x: Any, y: Any) -> Any:  # the same, another code object: its own dynamo cache
    import torch

    return torch.nn.functional.silu(x) * y


def kernel_child(args: argparse.Namespace) -> dict[str, Any]:
    import torch
    from torch._inductor import config

    x, y = torch.randn(4, 1536), torch.randn(4, 1536)
    fns: dict[str, Any] = {"eager": silu_mul_1}
    for name, threads, fn in (("single-threaded", 1, silu_mul_1), ("omp parallel", -1, silu_mul_2)):
        with config.patch({"cpp.threads": threads}):
            fns[name] = torch.compile(fn, fullgraph=True)
            fns[name](x, y)

    def us_per_call(fn: Any, n: int = 200) -> float:
        t0 = time.perf_counter()
        for _ in range(n):
            fn(x, y)
        return (time.perf_counter() - t0) / n * 1e6

    out: dict[str, Any] = {}
    for busy in sorted({0, args.busy}):
        procs = busy_loops(busy)
        try:
            times: dict[str, list[float]] = {k: [] for k in fns}
            for _ in range(args.rounds):
                for k, fn in fns.items():
                    times[k].append(us_per_call(fn))
        finally:
            stop(procs)
        out[str(busy)] = {k: sorted(v)[len(v) // 2] for k, v in times.items()}
    return out


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
    engines = {"eager": HfEngine(model, HfConfig(**common))}
    config = HfConfig(**common, compile_decode=True, compile_threads=args.compile_threads)
    engines["compiled"] = HfEngine(model, config)
    t0 = time.perf_counter()
    for eng in engines.values():
        await eng.start()
    start_s = time.perf_counter() - t0
    if not args.watch:  # what the compiled step itself costs: never falls back
        engines["compiled"]._batch.compiled.watch = None

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
        procs = busy_loops(busy)
        try:
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
            stop(procs)
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
    ap.add_argument("--child", choices=["engine", "kernel"], help=argparse.SUPPRESS)
    ap.add_argument("--compile-threads", type=int, default=1, help=argparse.SUPPRESS)
    ap.add_argument("--watch", type=int, default=1, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child == "engine":
        print(json.dumps(asyncio.run(child(args))))
        return 0
    if args.child == "kernel":
        print(json.dumps(kernel_child(args)))
        return 0

    info = machine()
    base = [sys.executable, __file__, "--rounds", str(args.rounds), "--busy", str(args.busy)]

    def run_child(cmd: list[str], env: dict[str, str]) -> Any:
        run = subprocess.run(cmd, env={**os.environ, **env}, capture_output=True, text=True)
        if run.returncode != 0:
            print(run.stderr[-3000:], file=sys.stderr)
            raise SystemExit(run.returncode)
        return json.loads(run.stdout.strip().splitlines()[-1])

    kernel = run_child([*base, "--child", "kernel"], {})
    results: dict[str, Any] = {}
    for name in args.variants:
        env, threads, watch = VARIANTS[name]
        cmd = [*base, "--child", "engine", "--precision", args.precision, "--tokens", str(args.tokens)]
        cmd += ["--model", args.model] if args.model else []
        cmd += ["--compile-threads", str(threads), "--watch", str(int(watch))]
        results[name] = run_child(cmd, env)
    info["load_avg_end"] = os.getloadavg()
    print(
        f"# {info['cpu_model']} {info.get('cpu_flags', [])}, {info['cpu_count']} CPUs; "
        f"load avg {info['load_avg'][0]:.2f} -> {info['load_avg_end'][0]:.2f}; "
        f"{args.tokens} tokens, median of {args.rounds}"
    )
    print(f"kernel: us/call {'busy':>4} " + " ".join(f"{k:>16}" for k in kernel["0"]))
    for busy, row in kernel.items():
        print(f"{'':<13}{busy:>4} " + " ".join(f"{v:>16.1f}" for v in row.values()))
    head = f"{'variant':<12} {'busy':>4} {'eager s/tok':>12} {'compiled s/tok':>15} {'ratio':>6}"
    print(f"{head} {'decode':>9}")
    for name, res in results.items():
        for busy, cond in res["conditions"].items():
            e, c = cond["s_per_token"]["eager"], cond["s_per_token"]["compiled"]
            print(f"{name:<12} {busy:>4} {e:>12.4f} {c:>15.4f} {c / e:>6.2f} {cond['decode']!s:>9}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    record = {"machine": info, "args": vars(args) | {"out": str(args.out)}, "kernel": kernel}
    args.out.write_text(json.dumps({**record, "engine": results}))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
