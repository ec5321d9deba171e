"""LoadAdapter latency per engine (issue 28: p50 <= 50 ms, p95 <= 100 ms at rank 16 on both engines).

For each engine: a real `effllm serve` with an adapter root of rank-R PEFT LoRA adapters (q, v projections,
distinct weights), a few warm-up loads, then N LoadAdapter / UnloadAdapter pairs over gRPC on an idle
server, timed at the client. The server's own split of each load (registry.LoadPhases: validate,
snapshot, scan, lock, engine_add, probe, evict; both engines do their probe's work inside engine_add:
hf in the add's worker job, vLLM beside add_lora) is read back from its log. Prints a table with the
CPU (lscpu's model name) and the load average, and writes JSON. Run it on an idle machine: a busy one
measures its neighbours.

    python bench/adapter_load.py                                   # hf and vllm, bf16, rank 16, N=50
    python bench/adapter_load.py --engines hf --trials 3 --warmup 1 # does it run?
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from _harness import header, machine_record, write_report
from adapters import load_phases, make_root, serve  # bench/adapters.py: the adapter root and the server

TARGET_P50_MS, TARGET_P95_MS = 50.0, 100.0


@dataclass(frozen=True)
class LoadRun:
    engine: str
    precision: str
    rank: int
    trials: int
    load_ms: list[float]  # client wall time of each LoadAdapter, in order
    unload_ms: list[float]
    phases_ms: dict[str, float] = field(default_factory=dict)  # server, median per phase

    @property
    def p50(self) -> float:
        return statistics.median(self.load_ms)

    @property
    def p95(self) -> float:
        ordered = sorted(self.load_ms)
        return ordered[min(len(ordered) - 1, round(0.95 * (len(ordered) - 1)))]

    @property
    def meets(self) -> bool:
        return self.p50 <= TARGET_P50_MS and self.p95 <= TARGET_P95_MS


def run_engine(a: argparse.Namespace, engine: str, root: Path, names: list[str], logs: Path) -> LoadRun:
    from effllm.client import EffllmClient

    server = serve(
        [
            "--engine",
            engine,
            "--precision",
            a.precision,
            "--adapter-root",
            str(root),
            "--max-adapter-rank",
            str(a.rank),
            "--max-adapters-per-batch",
            "2",
            "--max-adapters-resident",
            "4",
            "--kv-cache-gib",
            "0.25",
            "--max-context",
            "512",
            *a.server_arg,
        ],
        logs,
    )
    loads: list[float] = []
    unloads: list[float] = []
    keys: set[str] = set()
    try:
        with EffllmClient(server.target, timeout=300.0) as c:
            c.generate("Hello", max_new_tokens=2, temperature=0.0)  # first forward: kernels warmed
            # warm-up names come after the timed ones (names[a.adapters:]): the log's phases of the
            # timed names are then the timed loads' only
            order = names[a.adapters :] + [names[i % a.adapters] for i in range(a.trials)]
            for i, name in enumerate(order):
                t0 = time.perf_counter()
                c.load_adapter(name, "1")
                t1 = time.perf_counter()
                c.unload_adapter(name, "1")
                t2 = time.perf_counter()
                if i >= a.warmup:
                    loads.append((t1 - t0) * 1e3)
                    unloads.append((t2 - t1) * 1e3)
                    keys.add(f"{name}@1")
                time.sleep(a.gap_s)  # idle between loads, as loads come in a real server
        phases = load_phases(server.log(), keys)
    finally:
        server.stop()
    return LoadRun(engine, a.precision, a.rank, a.trials, loads, unloads, phases)


def table(runs: list[LoadRun]) -> str:
    lines = [
        "| engine | precision | rank | trials | load p50 ms | load p95 ms | max ms | unload p50 ms | "
        f"target ({TARGET_P50_MS:.0f}/{TARGET_P95_MS:.0f}) | median ms per phase (server) |",
        "|---|---|---:|---:|---:|---:|---:|---:|---|---|",
    ]
    for r in runs:
        phases = ", ".join(f"{k} {v:.1f}" for k, v in r.phases_ms.items()) or "-"
        lines.append(
            f"| {r.engine} | {r.precision} | {r.rank} | {r.trials} | {r.p50:.1f} | {r.p95:.1f} | "
            f"{max(r.load_ms):.1f} | {statistics.median(r.unload_ms):.1f} | "
            f"{'met' if r.meets else 'MISSED'} | {phases} |"
        )
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--engines", default="hf,vllm", help="each is passed to `effllm serve --engine`")
    p.add_argument("--precision", default="bf16")
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--trials", type=int, default=50, help="timed load/unload pairs per engine")
    p.add_argument("--warmup", type=int, default=3, help="untimed load/unload pairs first")
    p.add_argument("--adapters", type=int, default=8, help="distinct adapters the loads cycle through")
    p.add_argument("--gap-s", type=float, default=0.05, help="idle time after each load/unload pair")
    p.add_argument(
        "--threads",
        type=int,
        default=os.cpu_count() or 1,
        help="OMP_NUM_THREADS of the servers (bench/serving.py's default; the launcher alone would give 1, "
        "which doubles the hf engine's probe forward)",
    )
    p.add_argument("--server-arg", action="append", default=[], help="extra `effllm serve` flag (repeatable)")
    p.add_argument("--model", default=None, help="base checkpoint dir (default: the embedded default model)")
    p.add_argument("--out", type=Path, default=Path("runs") / "bench-adapter-load.json")
    a = p.parse_args()
    if a.trials < 1 or a.warmup < 0 or a.adapters < 1:
        p.error("--trials >= 1, --warmup >= 0 and --adapters >= 1 are required")

    from effllm.common.model import resolve_model

    record = machine_record()
    os.environ["OMP_NUM_THREADS"] = str(a.threads)  # the servers inherit it (effllm.client.launch)
    model = resolve_model(a.model)
    if a.model:
        a.server_arg += ["--model", str(model.path)]
    a.out.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="bench-adapter-load-"))
    runs: list[LoadRun] = []
    try:
        root = make_root(work, model.path, [a.rank], {a.rank: a.adapters + a.warmup})
        names = [f"r{a.rank}-{i}" for i in range(a.adapters + a.warmup)]
        for engine in a.engines.split(","):
            run = run_engine(a, engine, root, names, work)
            print(
                f"  {engine} {a.precision} r={a.rank}: p50 {run.p50:.1f} ms, p95 {run.p95:.1f} ms "
                f"({run.trials} loads)",
                flush=True,
            )
            runs.append(run)
    finally:
        for log in work.glob("*.log"):
            shutil.copy(log, a.out.parent / f"{a.out.stem}-{log.name}")
        shutil.rmtree(work, ignore_errors=True)
    report = {
        "model": model.name,
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(a).items()},
        "target_ms": {"p50": TARGET_P50_MS, "p95": TARGET_P95_MS},
        "runs": [{**asdict(r), "p50_ms": r.p50, "p95_ms": r.p95, "meets_target": r.meets} for r in runs],
    }
    write_report(a.out, report, record)
    print(f"{header(record)}; servers on {a.threads} threads")
    print(table(runs))
    print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
