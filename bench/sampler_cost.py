"""What the resource sampler costs the process it runs in: CPU per sample, and share of a core at a rate.

It samples a process tree like the server's (this process and `--children` idle children) from its own
thread, as `effllm serve` does, and reads the CPU time spent inside `sample()` (thread time) and by the
whole process over the window. Prints a table and writes JSON.

    python bench/sampler_cost.py --hz 10 --seconds 10
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from _harness import header, machine_record, write_report

from effllm.telemetry.sampler import ResourceSampler


def measure(hz: float, seconds: float, children: int) -> dict[str, Any]:
    idle = [sys.executable, "-c", "import time; time.sleep(3600)"]
    kids = [subprocess.Popen(idle) for _ in range(children)]
    try:
        sampler = ResourceSampler(hz, path=Path(tempfile.mkdtemp()) / "samples.jsonl")
        inside = [0.0, 0]
        take = sampler.sample

        def timed() -> Any:
            t0 = time.thread_time()
            try:
                return take()
            finally:
                inside[0] += time.thread_time() - t0
                inside[1] += 1

        sampler.sample = timed  # type: ignore[method-assign]
        sampler.start()
        time.sleep(1.0)  # past start-up
        in0, n0, cpu0, wall0 = inside[0], inside[1], time.process_time(), time.monotonic()
        time.sleep(seconds)
        n, cpu, wall = inside[1] - n0, time.process_time() - cpu0, time.monotonic() - wall0
        in_sample = inside[0] - in0
        sampler.stop()
    finally:
        for k in kids:
            k.kill()
    return {
        "hz": hz,
        "samples": n,
        "ms_per_sample_inside": 1e3 * in_sample / n,
        "ms_per_sample_process": 1e3 * cpu / n,
        "core_share_pct": 100.0 * cpu / wall,
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hz", type=float, nargs="+", default=[10.0, 1.0])
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--children", type=int, default=3, help="idle children (vLLM's engine core and workers)")
    ap.add_argument("--out", type=Path, default=Path("runs/bench-sampler-cost.json"))
    args = ap.parse_args()
    record = machine_record()
    rows = [measure(hz, args.seconds, args.children) for hz in args.hz]
    head = ("Hz", "samples", "ms/sample in sample()", "ms/sample process", "% of a core")
    print(f"{head[0]:>5} {head[1]:>8} {head[2]:>22} {head[3]:>18} {head[4]:>12}")
    for r in rows:
        print(
            f"{r['hz']:>5g} {r['samples']:>8} {r['ms_per_sample_inside']:>22.3f} "
            f"{r['ms_per_sample_process']:>18.3f} {r['core_share_pct']:>12.2f}"
        )
    write_report(args.out, {"children": args.children, "rows": rows}, record)
    print(header(record))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
