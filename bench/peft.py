"""PEFT benchmark script: `python bench/peft.py --steps 30` == `effllm tuner bench --steps 30`."""

from __future__ import annotations

import sys

from effllm.cli.main import main

if __name__ == "__main__":
    sys.exit(main(["tuner", "bench", *sys.argv[1:]]))
