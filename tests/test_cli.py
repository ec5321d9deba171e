"""The `effllm` dispatcher: every subcommand the brief names is there, and `bench` reaches the scripts."""

from __future__ import annotations

import subprocess
import sys

from effllm.cli.main import build_parser


def test_all_subcommands_are_registered() -> None:
    sub = next(a for a in build_parser()._actions if a.dest == "command")
    assert {"serve", "generate", "adapters", "tune", "load", "report", "bench"} <= set(sub.choices)


def test_bench_runs_a_script() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "effllm.cli.main", "bench", "serving", "--help"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0 and "--concurrency" in out.stdout
