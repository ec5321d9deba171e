"""Memory-read ceiling of batch-1 decoding on this machine: read bandwidth, and one matrix-vector product
over as many fp32 bytes as SmolLM2-135M's weights. Prints a table (with CPU model and load average) and
writes JSON.

Why: at batch 1 every decode step reads every weight once, so `weight bytes / matvec time` bounds tok/s
from above; docs/performance.md compares the serving table's c=1 column with it.

    python bench/membw.py --threads 1 2
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path
from typing import Any

import torch
from _harness import header, machine_record, write_report


def timed(fn: Any, repeats: int) -> float:
    fn()  # first touch and thread-pool start-up stay out of the timing
    t0 = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - t0) / repeats


def measure(threads: int, repeats: int) -> dict[str, float]:
    torch.set_num_threads(threads)
    a = torch.ones(2**28)  # 1 GiB of fp32
    w = torch.randn(576 * 4, 576 * 100)  # [2304, 57600] fp32: ~530 MB, SmolLM2-135M's fp32 weight bytes
    x = torch.randn(1, 576 * 4)
    read_s = timed(a.sum, repeats)
    matvec_s = timed(lambda: x @ w, repeats)
    return {
        "threads": threads,
        "read_gb_s": a.numel() * 4 / read_s / 1e9,
        "matvec_ms": matvec_s * 1e3,
        "matvec_gb_s": w.numel() * 4 / matvec_s / 1e9,
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, nargs="+", default=[1, os.cpu_count() or 1])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", type=Path, default=Path("runs/bench-membw.json"))
    args = ap.parse_args()
    record = machine_record()
    rows = [measure(t, args.repeats) for t in args.threads]
    write_report(args.out, {"rows": rows}, record)
    print(f"# {header(record)}")
    print(f"{'threads':>7} {'read GB/s':>10} {'matvec 530 MB ms':>17} {'matvec GB/s':>12}")
    for r in rows:
        print(f"{r['threads']:>7} {r['read_gb_s']:>10.1f} {r['matvec_ms']:>17.1f} {r['matvec_gb_s']:>12.1f}")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
