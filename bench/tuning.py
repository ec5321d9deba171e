"""Tuning-cost benchmark: `python bench/tuning.py --steps 30` == `effllm bench tuning`."""

from __future__ import annotations

import sys

from effllm.cli.main import main

if __name__ == "__main__":
    sys.exit(main(["tuner", "bench", *sys.argv[1:]]))
