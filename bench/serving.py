"""Serving benchmark: every side decodes exactly N tokens per request, side by side, in one run.

Sides (each in its own child process, one at a time, so none competes with another for the cores):
  vllm-offline  vLLM's own `LLM.generate`, with our server's engine settings (dtype, enforce_eager,
                max_num_seqs, KV cache bytes, max_model_len, OpenMP threads and thread binding)
  effllm-vllm   `effllm serve --engine vllm`, driven over gRPC by `c` closed-loop streaming clients
  effllm-hf     `effllm serve --engine hf` (the only side that also runs int4 on CPU)
  effllm-hf-compiled  the same with --compile-decode (static KV cache, one torch.compile'd step; its
                warm-up is paid at start-up, before the server turns SERVING, outside the timings)
  effllm-auto   `effllm serve` with no precision, engine or compile flag: what `auto` picks on this machine
                (and from a stored `effllm calibrate`), run as precision "auto"
  hf-generate   plain transformers `generate` in static batches of `c`
Every side gets the same completion-style prompts (the same token ids), greedy decoding and a fixed
N new tokens (ignore_eos + min_tokens on vLLM, min_new_tokens == max_new_tokens on transformers,
ignore_eos on effllm). A cell holds the tokens each request really decoded; a row (precision x
concurrency) whose cells did not all decode N tokens per request is REFUSED, not reported, and the
run exits 1. Sides alternate order between precisions and repeats, to cancel drift. Ratios are to
vllm-offline at the same precision (int4 has no vLLM CPU side: its ratio is to vllm-offline bf16).

    python bench/serving.py --precisions fp32 bf16 int4 --concurrency 1 8 32 --out runs/bench-serving.json

Invariant: a printed tok/s comes from a row whose every request decoded exactly --max-new-tokens tokens.
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
import time
from pathlib import Path
from typing import Any

# a script's folder is importable when it runs as one (bench/hf_engine.py imports TOPICS from here too)
from _serving_report import build_rows, format_cpu, format_table, n_requests

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
SIDES = ("vllm-offline", "effllm-vllm", "effllm-hf", "effllm-hf-compiled", "effllm-auto", "hf-generate")
PRECISIONS = {  # side -> precisions it runs on CPU
    "vllm-offline": ("fp32", "bf16", "fp16"),
    "effllm-vllm": ("fp32", "bf16", "fp16"),
    "effllm-hf": ("fp32", "bf16", "fp16", "int4"),
    "effllm-hf-compiled": ("fp32", "bf16", "fp16", "int4"),
    "hf-generate": ("fp32", "bf16", "fp16"),
    "effllm-auto": ("auto",),
}
TORCH_DTYPE = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}
MAX_CONTEXT = 1024


def prompts(n: int) -> list[str]:
    """Completion-style: the model continues the story instead of answering and stopping."""
    return [
        f"Here is a long, detailed story about {TOPICS[i % len(TOPICS)]}.\n\nChapter {i + 1}\n\nIt was"
        for i in range(n)
    ]


def machine() -> dict[str, Any]:
    from effllm.telemetry.machine import load_average
    from effllm.telemetry.machine import machine as this_machine

    m = this_machine()
    return {
        "cpu_count": m.cores,
        "load_avg": load_average(),
        "cpu_model": m.cpu_model,
        "cpu_flags": m.cpu_flags,
    }


# --- the sides (child processes) --------------------------------------------------------------------------
def role(proc: Any) -> str:
    """Which part of a side a process is: this driver, our server, or vLLM's engine core / worker."""
    try:
        cmd = " ".join(proc.cmdline())
    except Exception:
        return "other"
    for name in ("EngineCore", "Worker"):
        if f"VLLM::{name}" in cmd or proc.name().startswith(f"VLLM::{name}"):
            return f"vllm-{name.lower()}"
    return "server" if "effllm.cli.main serve" in cmd else "other"


def cpu_by_role() -> dict[str, float]:
    """CPU seconds (user + system) so far of this process ("driver": the client, or vLLM's / transformers'
    front-end in process) and of each role among its descendants."""
    import psutil

    me = psutil.Process()
    out: dict[str, float] = {"driver": sum(me.cpu_times()[:2])}
    for child in me.children(recursive=True):
        try:
            seconds = sum(child.cpu_times()[:2])
        except psutil.Error:
            continue
        out[role(child)] = out.get(role(child), 0.0) + seconds
    return out


def timed_levels(levels: list[int], per_level: int, run_level: Any) -> dict[str, Any]:
    """Run each level; record wall time, load average around it and CPU ms per decoded token by role."""
    out = {}
    for c in levels:
        before, cpu0 = os.getloadavg(), cpu_by_role()
        t0 = time.perf_counter()
        per_request, extra = run_level(c, prompts(n_requests(c, per_level)))
        seconds = time.perf_counter() - t0
        cpu1, tokens = cpu_by_role(), max(sum(per_request), 1)
        cpu_ms = {k: round(1e3 * (v - cpu0.get(k, 0.0)) / tokens, 3) for k, v in cpu1.items()}
        run = {"per_request": per_request, "seconds": seconds, "load_before": before}
        out[str(c)] = {**run, **extra, "cpu_ms_per_token": cpu_ms, "load_after": os.getloadavg()}
    return out


def side_vllm_offline(args: argparse.Namespace, model: str) -> dict[str, Any]:
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    llm = LLM(
        model=model,
        dtype=TORCH_DTYPE[args.precision],
        max_model_len=MAX_CONTEXT,
        max_num_seqs=max(args.concurrency),
        kv_cache_memory_bytes=int(args.kv_cache_gib * (1 << 30)),
        enforce_eager=not args.vllm_compile,  # the server's --vllm-compile, same on both sides
        seed=0,
        disable_log_stats=True,
    )
    tok = llm.get_tokenizer()
    n = args.max_new_tokens
    params = SamplingParams(max_tokens=n, min_tokens=n, ignore_eos=True, temperature=0.0)
    llm.generate(prompts(2), SamplingParams(max_tokens=4, temperature=0.0), use_tqdm=False)  # warm-up

    def level(c: int, texts: list[str]) -> tuple[list[int], dict[str, Any]]:
        ids = [TokensPrompt(prompt_token_ids=tok.encode(t, add_special_tokens=True)) for t in texts]
        counts: list[int] = []
        for i in range(0, len(ids), c):  # batches of c: with fixed N tokens, the same as c closed loops
            for r in llm.generate(ids[i : i + c], params, use_tqdm=False):
                counts.append(len(r.outputs[0].token_ids))
        return counts, {}

    return timed_levels(args.concurrency, args.requests, level)


def side_hf_generate(args: argparse.Namespace, model: str) -> dict[str, Any]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(args.threads)
    tok = AutoTokenizer.from_pretrained(model, padding_side="left")
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    lm = AutoModelForCausalLM.from_pretrained(model, dtype=getattr(torch, TORCH_DTYPE[args.precision]))
    lm.eval()
    n = args.max_new_tokens

    def generate(texts: list[str], new: int) -> list[int]:
        batch = tok(texts, return_tensors="pt", padding=True, add_special_tokens=True)
        with torch.inference_mode():
            out = lm.generate(
                **batch,
                max_new_tokens=new,
                min_new_tokens=new,
                do_sample=False,
                pad_token_id=tok.pad_token_id,
            )
        return [int(out.shape[1] - batch["input_ids"].shape[1])] * len(texts)  # [B, prompt + new]

    generate(prompts(2), 4)  # warm-up

    def level(c: int, texts: list[str]) -> tuple[list[int], dict[str, Any]]:
        counts: list[int] = []
        for i in range(0, len(texts), c):
            counts += generate(texts[i : i + c], n)
        return counts, {}

    return timed_levels(args.concurrency, args.requests, level)


async def drive(target: str, c: int, texts: list[str], max_new: int) -> tuple[list[int], dict[str, Any]]:
    """`c` closed-loop streaming clients; a request's count is the token ids the client received."""
    from effllm.client import AsyncEffllmClient

    queue: asyncio.Queue[str] = asyncio.Queue()
    for t in texts:
        queue.put_nowait(t)
    counts: list[int] = []
    ttfts: list[float] = []

    async def worker(client: AsyncEffllmClient) -> None:
        while not queue.empty():
            received = 0
            async for ch in client.stream(
                queue.get_nowait(), max_new_tokens=max_new, temperature=0.0, ignore_eos=True
            ):
                received += len(ch.token_ids)
                if ch.HasField("final"):
                    ttfts.append(ch.final.timings.time_to_first_token_s)
            counts.append(received)

    async with AsyncEffllmClient(target, timeout=900) as client:
        await client.generate(texts[0], max_new_tokens=4, temperature=0.0)  # warm-up
        await asyncio.gather(*(worker(client) for _ in range(c)))
    return counts, {"ttft_p50_s": statistics.median(ttfts) if ttfts else None}


def side_effllm(args: argparse.Namespace, side: str) -> dict[str, Any]:
    from effllm.client.launch import start_server

    engine = "hf" if side.startswith("effllm-hf") else "vllm"
    log_dir = Path(args.out).parent
    flags = ["--max-concurrency", str(max(args.concurrency))]
    if side != "effllm-auto":  # auto: the server decides precision, engine and compiled decode itself
        flags += ["--engine", engine, "--precision", args.precision]
    flags += ["--max-context", str(MAX_CONTEXT), "--kv-cache-gib", str(args.kv_cache_gib)]
    flags += ["--vllm-compile"] if args.vllm_compile and engine == "vllm" else []
    flags += ["--compile-decode"] if side == "effllm-hf-compiled" else []
    run_dir = log_dir / f"serve-{side.removeprefix('effllm-')}-{args.precision}"
    flags += ["--run-dir", str(run_dir), *args.server_arg]
    server = start_server(*flags, log_dir=log_dir, ready_timeout=900)
    try:
        return timed_levels(
            args.concurrency,
            args.requests,
            lambda c, texts: asyncio.run(drive(server.target, c, texts, args.max_new_tokens)),
        )
    finally:
        server.stop()


def run_side(args: argparse.Namespace) -> dict[str, Any]:
    from effllm.common.model import resolve_model

    model = str(resolve_model(None).path)
    side = args._side
    if side == "vllm-offline":
        return side_vllm_offline(args, model)
    if side == "hf-generate":
        return side_hf_generate(args, model)
    return side_effllm(args, side)


# --- the parent -------------------------------------------------------------------------------------------
def side_env(env: dict[str, str], side: str, omp_bind: str) -> dict[str, str]:
    """Under a binding, vLLM sets its worker's OpenMP threads from the CPU list and drops its scheduler
    process to one torch thread, unless OMP_NUM_THREADS is set from outside (then that process keeps
    spinning threads of its own): so a vLLM side under a binding gets no OMP_NUM_THREADS (the effllm
    launcher then gives the server process 1)."""
    if omp_bind != "nobind" and side in ("vllm-offline", "effllm-vllm"):
        return {k: v for k, v in env.items() if k != "OMP_NUM_THREADS"}
    return env


def child(args: argparse.Namespace, side: str, precision: str, env: dict[str, str]) -> dict[str, Any]:
    argv = [sys.executable, __file__, "--_side", side, "--precisions", precision, "--out", args.out]
    argv += ["--concurrency", *map(str, args.concurrency), "--requests", str(args.requests)]
    argv += ["--max-new-tokens", str(args.max_new_tokens), "--kv-cache-gib", str(args.kv_cache_gib)]
    argv += ["--threads", str(args.threads), *(["--vllm-compile"] if args.vllm_compile else [])]
    argv += [f"--server-arg={a}" for a in args.server_arg]
    t0 = time.perf_counter()
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        stdout, stderr = proc.communicate()
    except BaseException:  # Ctrl-C / SIGTERM: the child stops its server (see main) before we go
        proc.terminate()
        proc.wait(120)
        raise
    line = next((x for x in stdout.splitlines() if x.startswith("RESULT ")), None)
    if line is None:
        sys.exit(f"{side} {precision} failed (exit {proc.returncode}):\n{stderr[-4000:]}")
    return {"levels": json.loads(line[7:]), "wall_s": time.perf_counter() - t0}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sides", nargs="+", default=list(SIDES), choices=SIDES)
    ap.add_argument(
        "--precisions",
        nargs="+",
        default=["fp32", "bf16"],
        choices=["fp32", "bf16", "fp16", "int4", "auto"],
        help="auto: the effllm-auto side (the server's own choice)",
    )
    ap.add_argument("--concurrency", nargs="+", type=int, default=[1, 8, 32])
    ap.add_argument("--requests", type=int, default=4, help="requests per level (at least 2 x concurrency)")
    ap.add_argument("--max-new-tokens", type=int, default=64, help="tokens every request decodes")
    ap.add_argument("--repeats", type=int, default=1, help="runs of every side; the median is reported")
    ap.add_argument("--kv-cache-gib", type=float, default=1.0)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="OpenMP threads, every side")
    ap.add_argument(
        "--omp-bind",
        default=os.environ.get("VLLM_CPU_OMP_THREADS_BIND", "nobind"),
        help="VLLM_CPU_OMP_THREADS_BIND for both vLLM sides (auto: vLLM binds and reserves a core)",
    )
    ap.add_argument("--vllm-compile", action="store_true", help="vLLM's compiled mode on both vLLM sides")
    ap.add_argument("--server-arg", action="append", default=[], help="extra `effllm serve` flag (repeat)")
    ap.add_argument("--out", default="runs/bench-serving.json")
    ap.add_argument("--_side", choices=SIDES, help=argparse.SUPPRESS)
    args = ap.parse_args()

    # SIGTERM unwinds (finally blocks run): a side's server and vLLM's processes are stopped, not orphaned.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    if args._side:  # child mode: one side, one precision; print the result as JSON
        args.precision = args.precisions[0]
        print("RESULT " + json.dumps(run_side(args)), flush=True)
        return 0

    out_path = Path(args.out)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    env = {
        **os.environ,
        "OMP_NUM_THREADS": str(args.threads),
        "VLLM_CPU_OMP_THREADS_BIND": args.omp_bind,
        "VLLM_LOGGING_LEVEL": "WARNING",
    }
    meta = {
        **machine(),
        "threads": args.threads,
        "omp_bind": args.omp_bind,
        "max_new_tokens": args.max_new_tokens,
        "engine": {
            "max_model_len": MAX_CONTEXT,
            "max_num_seqs": max(args.concurrency),
            "kv_cache_gib": args.kv_cache_gib,
            "enforce_eager": not args.vllm_compile,
        },
        "args": {k: v for k, v in vars(args).items() if not k.startswith("_")},
        "started": time.time(),
    }
    print(
        f"# {meta['cpu_model']} ({', '.join(meta.get('cpu_flags', []))}), {meta['cpu_count']} CPUs, "
        f"{args.threads} OpenMP threads, bind {args.omp_bind}; load avg {meta['load_avg']}",
        flush=True,
    )
    results: dict[tuple[str, str], dict[str, Any]] = {}
    plan = [(p, [s for s in args.sides if p in PRECISIONS[s]]) for p in args.precisions]
    step = 0
    for repeat in range(args.repeats):
        for precision, sides in plan:
            for side in sides if step % 2 == 0 else sides[::-1]:  # alternate order against drift
                r = child(args, side, precision, side_env(env, side, args.omp_bind))
                cell = results.setdefault((precision, side), {"levels": {}, "wall_s": 0.0})
                cell["wall_s"] += r["wall_s"]
                for c, run in r["levels"].items():
                    cell["levels"].setdefault(c, {"runs": []})["runs"].append(run)
                rates = ", ".join(
                    f"c={c} {sum(x['per_request']) / x['seconds']:.1f}" for c, x in r["levels"].items()
                )
                print(f"  [{repeat}] {precision} {side}: {rates} tok/s ({r['wall_s']:.0f}s)", flush=True)
            step += 1

    rows, refused = build_rows(results, args.concurrency, args.max_new_tokens, args.requests)
    meta["load_avg_end"] = os.getloadavg()
    meta["wall_s"] = time.time() - meta["started"]
    print(
        f"\n{args.max_new_tokens} new tokens per request, greedy; ratio to vLLM offline at the same "
        f"precision (int4: to bf16). Load avg {meta['load_avg']} -> {meta['load_avg_end']}"
    )
    print(format_table(rows, args.concurrency, args.max_new_tokens))
    print("\n" + format_cpu(rows))
    for r in refused:
        print(f"REFUSED {r['precision']} c={r['concurrency']}: {r['reason']}")
    raw = {f"{p}/{s}": v for (p, s), v in results.items()}
    out_path.write_text(json.dumps({"meta": meta, "rows": rows, "refused": refused, "raw": raw}, indent=2))
    print(f"wrote {out_path}")
    return 1 if refused else 0


if __name__ == "__main__":
    sys.exit(main())
