"""`effllm calibrate [serve flags]`: measure every configuration this server could host for the model
(precision fp32/bf16/int4 x engine vllm/hf x compiled decode on/off for hf) on this machine, print a
table and store it for `auto` (server/calibration.py).

Each configuration runs in its own child process (`python -m effllm.server.calibrate SPEC`), one at a
time, so none competes with another for the cores and a failure or a leaked thread stays there: the child
builds the engine exactly as `effllm serve` does (server/engine_args.py build_engine), starts it
(compiled decode warms up inside start, outside the timings), sends one warm-up round, then `repeats`
rounds of `requests` requests through c closed-loop clients straight into `engine.generate`, at c=1
and at c=--max-concurrency. Every request is greedy and decodes exactly --max-new-tokens tokens
(ignore_eos); a round is tokens / wall seconds, and a figure is the median of its rounds with their
spread and count.
Invariant: a stored figure comes from rounds whose every request decoded exactly the asked token count;
anything else is a skipped configuration, with why.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import subprocess
import sys
import time
from dataclasses import replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from ..telemetry.machine import load_average, machine
from . import calibration
from .calibration import Calibration, Config, Figure, Key, Measured
from .engine_args import EngineArgs, build_engine, resolve_device
from .engines import compile_cache

log = logging.getLogger("effllm.server")

PROMPTS = (  # completion style: the model continues instead of answering and stopping
    "Here is a long, detailed story about a lighthouse keeper.\n\nChapter 1\n\nIt was",
    "Here is a long, detailed story about the history of tea.\n\nChapter 1\n\nIt was",
    "Here is a long, detailed story about a robot learning to paint.\n\nChapter 1\n\nIt was",
    "Here is a long, detailed story about winter in Oslo.\n\nChapter 1\n\nIt was",
)
_CHILD_TIMEOUT_S = 3600.0


def add_parser(sub: argparse._SubParsersAction) -> None:
    from .cli import add_serve_flags

    p = sub.add_parser(
        "calibrate",
        help="measure every configuration this server could host here; `auto` then uses the best",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        conflict_handler="resolve",  # --max-new-tokens / --max-concurrency mean the measurement's here
    )
    add_serve_flags(p)
    p.add_argument("--max-concurrency", type=int, default=8, help="the second concurrency measured")
    p.add_argument("--max-new-tokens", type=int, default=32, help="tokens every request decodes")
    p.add_argument("--requests", type=int, default=4, help="requests per round (at least 2 x c)")
    p.add_argument("--repeats", type=int, default=3, help="rounds per concurrency; the median is kept")
    p.add_argument(
        "--configs",
        default="",
        help="comma list of PRECISION:ENGINE[:compiled] to measure (e.g. bf16:hf:compiled,fp32:vllm); "
        "default: every one the serve flags allow",
    )
    p.add_argument(
        "--quick", action="store_true", help="one round of 16 tokens each, no int4 (auto never picks it)"
    )
    p.add_argument("--no-save", action="store_true", help="print the table, store nothing")
    p.set_defaults(func=run)


# --- what to measure ---------------------------------------------------------------------------------------
def plan(
    args: EngineArgs, device: str, configs_flag: str = "", quick: bool = False
) -> list[tuple[Config, str]]:
    """(config, why it is skipped or "") for every configuration the engine flags allow (configs_flag:
    --configs, quick: --quick)."""
    if configs_flag:
        configs = [Config.parse(s) for s in configs_flag.split(",") if s.strip()]
    else:
        configs = [
            c
            for c in calibration.all_configs()
            if (args.precision == "auto" or c.precision == args.precision)
            and (args.engine == "auto" or c.engine == args.engine)
            and (args.compile_decode is None or c.compiled == args.compile_decode)
            and not (quick and c.precision == "int4")
        ]
    methods = args.methods
    out = []
    for c in configs:
        why = ""
        if c.engine == "vllm" and c.precision == "int4" and device == "cpu":
            why = "vLLM's CPU backend has no int4"
        elif c.engine == "vllm" and "dora" in methods:
            why = "--adapter-methods has dora, which only the hf engine serves"
        elif c.engine == "vllm" and not _importable("vllm"):
            why = "vllm is not installed"
        out.append((c, why))
    return out


def _importable(name: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(name) is not None


# --- the parent -----------------------------------------------------------------------------------------
def run(args: argparse.Namespace) -> int:
    from ..common.model import resolve_model

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.quick:
        args.repeats, args.max_new_tokens = 1, min(args.max_new_tokens, 16)
    if args.max_concurrency < 1 or args.max_new_tokens < 1 or args.repeats < 1 or args.requests < 1:
        print(
            "effllm calibrate: --max-concurrency, --max-new-tokens, --repeats, --requests >= 1",
            file=sys.stderr,
        )
        return 2
    try:
        device = resolve_device(args.device)
        engine_args = EngineArgs.from_cli_args(args)
        todo = plan(engine_args, device, args.configs, args.quick)
        model = resolve_model(engine_args.model)
    except ValueError as err:
        print(f"effllm calibrate: {err}", file=sys.stderr)
        return 2
    here = machine(device)
    load_before = load_average()
    print(f"# effllm calibrate: {model.name} on {here.describe()}; load avg {_load(load_before)}", flush=True)
    rows = []
    for config, why in todo:
        if why:
            rows.append(Measured(config, skipped=why))
            print(f"  {config.name}: skipped ({why})", flush=True)
            continue
        t0 = time.monotonic()
        measured = _child(args, config)
        rows.append(measured)
        got = measured.skipped or f"c=1 {measured.c1}, c={args.max_concurrency} {measured.cmax}"
        print(f"  {config.name}: {got} ({time.monotonic() - t0:.0f} s)", flush=True)
    cal = Calibration(
        key=Key(here, model.fingerprint, calibration.library_versions()),
        taken=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        max_concurrency=args.max_concurrency,
        new_tokens=args.max_new_tokens,
        requests=args.requests,
        rows=tuple(rows),
        context={"model": model.name, "load_avg": [load_before, load_average()], "device": device},
    )
    print(format_table(cal))
    if not any(m.c1 for m in rows):
        print("nothing measured: nothing stored", file=sys.stderr)
        return 1
    print(f"auto would pick: {calibration.choose_auto(here, cal).reason}")
    if not args.no_save:
        print(f"stored {calibration.save(cal)}")
    return 0


def _load(avg: tuple[float, float, float]) -> str:
    return " ".join(f"{x:.2f}" for x in avg)


def format_table(cal: Calibration) -> str:
    n, c = cal.new_tokens, cal.max_concurrency
    load = cal.context.get("load_avg") or [[0.0] * 3, [0.0] * 3]
    lines = [
        f"\n{n} new tokens per request (greedy, ignore_eos); tok/s median (low-high, n rounds); "
        f"{cal.requests} requests per round, at least 2 x c; load avg {_load(load[0])} -> {_load(load[1])}",
        f"| config | c=1 tok/s | c={c} tok/s |",
        "|---|---:|---:|",
    ]
    for m in cal.rows:
        if m.c1 is None or m.cmax is None:
            lines.append(f"| {m.config.describe()} | skipped: {m.skipped} | |")
        else:
            lines.append(f"| {m.config.describe()} | {m.c1} | {m.cmax} |")
    return "\n".join(lines)


def _child(args: argparse.Namespace, config: Config) -> Measured:
    spec = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k != "func"}
    spec["config"] = config.name
    cmd = [sys.executable, "-m", "effllm.server.calibrate", json.dumps(spec)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        stdout, stderr = proc.communicate(timeout=_CHILD_TIMEOUT_S)
    except BaseException:  # timeout, Ctrl-C: the child (and its engine) goes with us
        proc.kill()
        proc.wait()
        raise
    line = next((x for x in stdout.splitlines() if x.startswith("RESULT ")), None)
    if line is None:
        tail = [x for x in stderr.strip().splitlines() if x.strip()][-1:] or [f"exit {proc.returncode}"]
        return Measured(config, skipped=f"failed: {tail[0][:200]}")
    result = json.loads(line[7:])
    return Measured(config, Figure.of(result["c1"]), Figure.of(result["cmax"]))


# --- the child ------------------------------------------------------------------------------------------
async def _round(engine: Any, c: int, n: int, new_tokens: int, tag: str) -> float:
    """n requests through c closed-loop clients -> tok/s; ValueError unless each decoded new_tokens."""
    from .engines.base import GenerationRequest, Sampling

    queue: asyncio.Queue[int] = asyncio.Queue()
    for i in range(n):
        queue.put_nowait(i)
    counts: list[int] = []

    async def client() -> None:
        while not queue.empty():
            i = queue.get_nowait()
            request = GenerationRequest(
                f"cal-{tag}-{c}-{i}",
                Sampling(max_new_tokens=new_tokens, temperature=0.0, ignore_eos=True),
                prompt=PROMPTS[i % len(PROMPTS)],
            )
            got = 0
            async for event in engine.generate(engine.prepare(request)):
                got += len(event.token_ids)
            counts.append(got)

    t0 = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(c)))
    seconds = time.perf_counter() - t0
    if any(x != new_tokens for x in counts):
        raise ValueError(f"c={c}: requests decoded {sorted(set(counts))} tokens, not {new_tokens}")
    return sum(counts) / seconds


async def measure(args: argparse.Namespace, config: Config) -> dict[str, list[float]]:
    engine_args = replace(EngineArgs.from_cli_args(args), compile_decode=config.compiled)
    engine = build_engine(engine_args, config.precision, config.engine)
    await engine.start()
    try:
        out: dict[str, list[float]] = {}
        for name, c in (("c1", 1), ("cmax", args.max_concurrency)):
            n = max(args.requests, 2 * c)
            await _round(engine, c, c, 4, "warm")
            out[name] = [await _round(engine, c, n, args.max_new_tokens, str(r)) for r in range(args.repeats)]
        return out
    finally:
        await engine.shutdown()


def child_main(spec_json: str) -> int:
    spec = json.loads(spec_json)
    config = Config.parse(spec.pop("config"))
    args = argparse.Namespace(**spec)  # the adapter root too: as the server would run, vLLM reserves
    # its LoRA slots (EngineArgs.from_cli_args turns the JSON back into its types)
    compile_cache.persist()  # as `effllm serve` does: a compiled config reuses (and leaves) the kernels
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    result = asyncio.run(measure(args, config))
    print("RESULT " + json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    from . import lifeline

    lifeline.die_with_parent(os.getppid())  # a killed `effllm calibrate` takes its measurement along
    lifeline.install()  # and the engine's children (vLLM's engine core) die with this child
    sys.exit(child_main(sys.argv[1]))
