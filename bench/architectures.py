"""The architecture table: the study's architecture axis (MHA, GQA, MQA, MLA, MoE, GPT-NeoX...) measured on
the hf engine, in-process (no gRPC), on the RANDOM-INIT family of `effllm models make-family` (one width,
depth and tokenizer), optionally beside catalogue models. Per member, a fixed prompt and a fixed number of
new tokens (greedy, ignore_eos) at each concurrency:

  AMU  weight bytes (measured, the engine's) and KV-cache bytes per token (measured on a DynamicCache
       against computed from config.json)
  AL   TTFT and TPOT (median over the requests of a level)
  AT   output tokens/s of the level
  PCU  the process's CPU seconds over the level / (wall seconds x CPUs)
  MCR  the row's weight bytes / the hf engine's int4 weight bytes of the same model (`--no-mcr`: skipped)
  AEC  joules per token, ESTIMATED: process CPU seconds x watts per core (telemetry/energy.py)
  parameters and active parameters (MoE: the routed experts a token skips are not active)

A member the hf engine cannot run (engine_support: the attention-free ones) is listed with the reason and,
unless --no-transformers-rows, measured with transformers' own `generate` instead (batch of c identical
prompts, same token counts), in rows marked engine "transformers": the study's attention-free data points,
which are not the engine's figures.

    python bench/architectures.py --max-new 32 --concurrency 1 4 --out runs/bench-architectures.json \
        --html runs/bench-architectures.html
    python bench/architectures.py --family DIR --models smollm2-135m   # an existing family, plus SmolLM2

Prints a Markdown table headed by the CPU model and load average; writes JSON (and HTML with one plot per
metric when matplotlib is installed). Run it on an idle machine: every figure is a timing.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

PROMPT = "Write a long, detailed story about a lighthouse keeper and the sea."
METRICS = {  # JSON key -> (column, unit) of the table and plots
    "weight_mb": ("weights", "MB"),
    "kv_bytes_per_token": ("KV/token measured", "B"),
    "kv_bytes_per_token_computed": ("KV/token computed", "B"),
    "ttft_ms": ("TTFT", "ms"),
    "tpot_ms": ("TPOT", "ms"),
    "tokens_per_s": ("AT", "tok/s"),
    "pcu": ("PCU", "share of the CPUs"),
    "joules_per_token": ("J/token (est.)", "J"),
}


async def run_level(engine: Any, c: int, max_new: int) -> dict[str, float]:
    """`c` concurrent requests, each exactly `max_new` tokens; per-request TTFT and TPOT, level tok/s and
    the process's CPU seconds over the level."""
    import psutil

    from effllm.server.engines.base import GenerationRequest, Sampling

    async def one(i: int) -> tuple[float, float, int]:
        request = GenerationRequest(
            f"arch-{c}-{i}-{time.monotonic_ns()}",
            Sampling(max_new_tokens=max_new, temperature=0.0, ignore_eos=True),
            prompt=PROMPT,  # a prompt, not chat turns: base models (Gemma-3-270M) have no chat template
        )
        t0 = time.perf_counter()
        first = last = 0.0
        tokens = 0
        async for event in engine.generate(request):
            last = time.perf_counter()
            first = first or last
            tokens += len(event.token_ids)
        tpot = (last - first) / (tokens - 1) if tokens > 1 else 0.0
        return first - t0, tpot, tokens

    proc = psutil.Process()
    cpu0 = sum(proc.cpu_times()[:2])
    t0 = time.perf_counter()
    results = await asyncio.gather(*(one(i) for i in range(c)))
    seconds = time.perf_counter() - t0
    cpu_s = sum(proc.cpu_times()[:2]) - cpu0
    tokens = sum(r[2] for r in results)
    if tokens != c * max_new:
        raise RuntimeError(f"c={c}: {tokens} tokens, expected {c * max_new}")
    return {
        "ttft_ms": statistics.median(r[0] for r in results) * 1e3,
        "tpot_ms": statistics.median(r[1] for r in results) * 1e3,
        "tokens_per_s": tokens / seconds,
        "cpu_s": cpu_s,
        "pcu": cpu_s / (seconds * (os.cpu_count() or 1)),  # the machine's CPUs this process kept busy
        "tokens": tokens,
    }


def measure_kv_bytes_per_token(path: Path, dtype: Any) -> float:
    """Bytes a DynamicCache grows by per prompt token (two prefills, 16 and 48 tokens, same model)."""
    import torch
    from transformers import AutoModelForCausalLM, DynamicCache

    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).eval()
    sizes = []
    for n in (16, 48):
        cache = DynamicCache(config=model.config)
        with torch.no_grad():
            model(input_ids=torch.ones((1, n), dtype=torch.long), past_key_values=cache, use_cache=True)
        sizes.append(sum(t.nbytes for layer in cache.layers for t in (layer.keys, layer.values)))
    return (sizes[1] - sizes[0]) / 32


async def bench_model(name: str, path: Path, args: argparse.Namespace, watts: float) -> dict[str, Any]:
    import torch

    from effllm.common.architecture import describe, engine_support
    from effllm.common.model import resolve_model
    from effllm.server.engines.hf_engine import HfConfig, HfEngine

    config = json.loads((path / "config.json").read_text())
    arch = describe(config)
    row: dict[str, Any] = {
        "name": name,
        "model_type": arch.model_type,
        "family": arch.family,
        "attention": arch.attention,
        "kv_heads": arch.kv_heads,
        "experts": f"{arch.top_k}/{arch.experts}" if arch.experts else "",
        "random_init": arch.random_init,
    }
    levels_asked = list(args.concurrency)
    ok, reason = engine_support("hf", config, precision=args.precision, max_concurrency=max(levels_asked))
    if not ok and engine_support("hf", config, precision=args.precision, max_concurrency=1)[0]:
        # it runs one row at a time (e.g. Gemma's sliding-window caches): measure c=1 only, say why
        print(f"  {name}: c=1 only on the hf engine: {reason}", flush=True)
        row["note"], levels_asked, ok = f"c=1 only: {reason}", [1], True
    if not ok:
        print(f"  {name}: refused on the hf engine: {reason}", flush=True)
        if args.transformers_rows and arch.ssm:
            return {**row, "refused": reason, **bench_transformers(name, path, arch, args, watts)}
        return {**row, "refused": reason}
    engine = HfEngine(
        resolve_model(str(path)),
        HfConfig(precision=args.precision, max_concurrency=max(levels_asked), max_context=512),
    )
    await engine.start()
    try:
        await run_level(engine, 1, 2)  # warm-up
        levels = {}
        for c in levels_asked:
            level = await run_level(engine, c, args.max_new)
            level["joules_per_token"] = level["cpu_s"] * watts / level["tokens"]
            levels[str(c)] = level
            print(f"  {name} c={c}: {level['tokens_per_s']:.1f} tok/s", flush=True)
        info = engine.info
    finally:
        await engine.shutdown()
    mcr = await int4_ratio(path, info.weight_bytes) if args.mcr else None
    dtype, dtype_bytes = (torch.float32, 4) if args.precision == "fp32" else (torch.bfloat16, 2)
    return {
        **row,
        "engine": "hf",
        "parameters": info.parameters,
        "active_parameters": arch.active_parameters(info.parameters),
        "weight_mb": info.weight_bytes / 1e6,
        "mcr_int4": mcr,
        "kv_bytes_per_token": measure_kv_bytes_per_token(path, dtype),
        "kv_bytes_per_token_computed": arch.kv_bytes_per_token(dtype_bytes),
        "levels": levels,
    }


async def int4_ratio(path: Path, weight_bytes: int) -> float | None:
    """MCR of the hf engine's int4 weights: this row's weight bytes over the int4 engine's (None: int4
    cannot quantise this model's shapes here)."""
    from effllm.common.model import resolve_model
    from effllm.server.engines.hf_engine import HfConfig, HfEngine

    engine = HfEngine(resolve_model(str(path)), HfConfig(precision="int4", max_concurrency=1, max_context=64))
    try:
        await engine.start()
        return weight_bytes / engine.info.weight_bytes
    except Exception as err:  # reported in the row, the table goes on
        print(f"  {path.name}: no int4 here ({type(err).__name__}: {str(err)[:120]})", flush=True)
        return None
    finally:
        await engine.shutdown()


def bench_transformers(
    name: str, path: Path, arch: Any, args: argparse.Namespace, watts: float
) -> dict[str, Any]:
    """A model the hf engine refuses, on transformers' `generate` (its own recurrent state handling)."""
    import psutil
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.generation.streamers import BaseStreamer

    from effllm.common.model import count_parameters

    class Clock(BaseStreamer):  # generate() puts the prompt, then each step's new tokens
        def __init__(self) -> None:
            self.times: list[float] = []

        def put(self, value: Any) -> None:
            self.times.append(time.perf_counter())

        def end(self) -> None:
            pass

    dtype = torch.float32 if args.precision == "fp32" else torch.bfloat16
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).eval()
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": PROMPT}], add_generation_prompt=True, tokenize=False
    )
    prompt = tokenizer(text, return_tensors="pt", add_special_tokens=False).input_ids

    def level(c: int, n: int) -> dict[str, float]:
        ids = prompt.repeat(c, 1)
        clock = Clock()
        proc = psutil.Process()
        cpu0 = sum(proc.cpu_times()[:2])
        t0 = time.perf_counter()
        with torch.no_grad():
            out = model.generate(
                input_ids=ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=n,
                min_new_tokens=n,
                do_sample=False,
                streamer=clock,
                pad_token_id=tokenizer.pad_token_id or 0,
            )
        seconds = time.perf_counter() - t0
        tokens = (out.shape[1] - ids.shape[1]) * c
        if tokens != c * n:
            raise RuntimeError(f"{name} c={c}: {tokens} tokens, expected {c * n}")
        steps = clock.times[1:]  # [0]: the prompt
        return {
            "ttft_ms": (steps[0] - t0) * 1e3,
            "tpot_ms": (steps[-1] - steps[0]) / max(1, len(steps) - 1) * 1e3,
            "tokens_per_s": tokens / seconds,
            "cpu_s": (cpu := sum(proc.cpu_times()[:2]) - cpu0),
            "pcu": cpu / (seconds * (os.cpu_count() or 1)),
            "tokens": tokens,
        }

    level(1, 2)  # warm-up
    levels = {}
    for c in args.concurrency:
        lv = level(c, args.max_new)
        lv["joules_per_token"] = lv["cpu_s"] * watts / lv["tokens"]
        levels[str(c)] = lv
        print(f"  {name} c={c} (transformers generate): {lv['tokens_per_s']:.1f} tok/s", flush=True)
    params = count_parameters(path)
    return {
        "engine": "transformers",
        "parameters": params,
        "active_parameters": arch.active_parameters(params),
        "weight_mb": sum(p.nbytes for p in model.parameters()) / 1e6,
        "kv_bytes_per_token": 0.0,  # a constant recurrent state: nothing grows per token
        "kv_bytes_per_token_computed": arch.kv_bytes_per_token(4 if args.precision == "fp32" else 2),
        "levels": levels,
    }


def table(rows: list[dict[str, Any]], concurrency: list[int]) -> str:
    cols = ["model", "engine", "attention", "params (active)", "weights MB", "MCR int4"]
    cols += ["KV B/token meas./comp."]
    for c in concurrency:
        cols += [f"TTFT ms c={c}", f"TPOT ms c={c}", f"tok/s c={c}", f"PCU c={c}", f"J/token c={c} (est.)"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        name = r["name"] + (" (random-init)" if r["random_init"] else "")
        if "levels" not in r:
            lines.append(f"| {name} | refused on the hf engine: {r['refused']} |")
            continue
        moe = f" MoE {r['experts']}" if r["experts"] else ""
        cells = [
            name,
            r["engine"],
            r["attention"] + moe,
            f"{r['parameters'] / 1e6:.2f}M ({r['active_parameters'] / 1e6:.2f}M)",
            f"{r['weight_mb']:.1f}",
            f"{r['mcr_int4']:.2f}" if r.get("mcr_int4") else "-",
            f"{r['kv_bytes_per_token']:.0f} / {r['kv_bytes_per_token_computed']}",
        ]
        for c in concurrency:
            lv = r["levels"].get(str(c))
            if lv is None:  # not measured at this concurrency (the row's note says why)
                cells += ["-"] * 5
                continue
            cells += [
                f"{lv['ttft_ms']:.1f}",
                f"{lv['tpot_ms']:.1f}",
                f"{lv['tokens_per_s']:.1f}",
                f"{100 * lv['pcu']:.0f} %",
                f"{lv['joules_per_token']:.3f}",
            ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def html_report(
    rows: list[dict[str, Any]], report: dict[str, Any], concurrency: list[int], machine: str
) -> str | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    served = [r for r in rows if "levels" in r]
    names = [r["name"] + ("*" if r["engine"] != "hf" else "") for r in served]
    figures = []
    for key, (label, unit) in METRICS.items():
        fig, ax = plt.subplots(figsize=(7, 3.2))
        if key in ("ttft_ms", "tpot_ms", "tokens_per_s", "pcu", "joules_per_token"):
            width = 0.8 / len(concurrency)
            for j, c in enumerate(concurrency):
                xs = [i + j * width for i in range(len(served))]
                ys = [r["levels"].get(str(c), {}).get(key, 0.0) for r in served]
                ax.bar(xs, ys, width, label=f"c={c}")
            ax.legend()
        else:
            ax.bar(range(len(served)), [r[key] for r in served])
        ax.set_xticks(range(len(served)), names, rotation=20)
        ax.set_title(f"{label} ({unit}) — random-init family, hf engine")
        buf = io.BytesIO()
        fig.tight_layout()
        fig.savefig(buf, format="png")
        plt.close(fig)
        figures.append(
            f"<h2>{label}</h2><img src='data:image/png;base64,{base64.b64encode(buf.getvalue()).decode()}'>"
        )
    head = (
        f"<h1>effllm architecture table (RANDOM-INIT weights: costs, not quality)</h1>"
        f"<p>{machine}; {report['args']['max_new']} new tokens, {report['args']['precision']}; "
        f"J/token estimated at {report['watts_per_core']} W per busy core. *: transformers' generate, not "
        "the hf engine (which refuses attention-free models).</p>"
    )
    return "<html><body>" + head + "\n".join(figures) + "</body></html>"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--family", type=Path, default=None, help="an existing make-family folder (default: make one)"
    )
    p.add_argument("--members", default="", help="comma list (default: every member of the family)")
    p.add_argument("--models", nargs="*", default=[], help="catalogue names or checkpoint dirs to add")
    p.add_argument("--precision", default="fp32", choices=("fp32", "bf16"))
    p.add_argument("--concurrency", nargs="+", type=int, default=[1, 4])
    p.add_argument("--max-new", type=int, default=32)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--watts-per-core", type=float, default=None, help="default: EFFLLM_WATTS_PER_CORE or 10")
    p.add_argument("--out", default="runs/bench-architectures.json")
    p.add_argument("--html", default="", help="also write an HTML report here (needs matplotlib)")
    p.add_argument(
        "--no-mcr", dest="mcr", action="store_false", help="skip the int4 engine per row (MCR column)"
    )
    p.add_argument(
        "--no-transformers-rows",
        dest="transformers_rows",
        action="store_false",
        help="no transformers-generate rows for the attention-free members the hf engine refuses",
    )
    args = p.parse_args()

    import torch
    from _harness import header, machine_record, write_report

    from effllm.common.family import MEMBERS, make_family
    from effllm.common.model import resolve_model
    from effllm.telemetry.energy import resolve_watts_per_core

    if args.threads:
        torch.set_num_threads(args.threads)
    watts = resolve_watts_per_core(args.watts_per_core)
    members = tuple(m for m in args.members.split(",") if m) or MEMBERS
    record = machine_record()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        family = args.family or Path(tmp) / "family"
        if args.family is None:
            make_family(family, resolve_model(None).path, members=members)
        for member in members:
            rows.append(asyncio.run(bench_model(member, family / member, args, watts)))
        for spec in args.models:
            rows.append(asyncio.run(bench_model(spec, resolve_model(spec).path, args, watts)))
    report = {
        "note": "family members are RANDOM-INIT: their figures are costs, never quality",
        "torch_threads": torch.get_num_threads(),
        "watts_per_core": watts,
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "rows": rows,
    }
    out = Path(args.out)
    write_report(out, report, record)
    print(
        f"\nhf engine, {args.precision}, {args.max_new} new tokens (greedy, ignore_eos); torch threads "
        f"{torch.get_num_threads()}; J/token estimated at {watts} W per busy core. RANDOM-INIT family.\n"
        f"{header(record)}\n"
    )
    print(table(rows, args.concurrency))
    print(f"wrote {out}")
    if args.html:
        page = html_report(rows, report, args.concurrency, header(record))
        if page is None:
            print("no matplotlib: no HTML report", file=sys.stderr)
        else:
            Path(args.html).write_text(page)
            print(f"wrote {args.html}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
