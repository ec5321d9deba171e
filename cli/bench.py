"""`effllm bench NAME [ARGS...]`: run a benchmark script from bench/ (each prints a table, writes JSON)."""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent.parent / "bench"


def scripts() -> list[str]:
    # _name.py: a helper module of the scripts, not a benchmark of its own
    found = BENCH_DIR.glob("[!_]*.py") if BENCH_DIR.is_dir() else []
    return sorted(p.stem.replace("_", "-") for p in found)


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "bench", help=f"run a benchmark: {', '.join(scripts()) or 'none (needs a source checkout)'}"
    )
    p.add_argument("name", choices=scripts())
    p.add_argument(
        "args", nargs=argparse.REMAINDER, help="passed to the script (see `effllm bench NAME --help`)"
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    script = BENCH_DIR / f"{args.name.replace('-', '_')}.py"
    return subprocess.call([sys.executable, str(script), *args.args])
