"""`effllm`: a thin dispatcher; each package owns its subcommands (see docs/architecture.md).

Invariant: a subcommand's module is imported here only to add its parser; each one imports its heavy
dependencies (torch, vLLM, Locust) inside the function that runs it, so `effllm generate` never loads them.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from effllm.server import lifeline as _lifeline

if _lifeline.spawned_child():  # vLLM's engine core started with `spawn` (CUDA): die with the server
    _lifeline.die_with_parent()

# Each module has `add_parser(subparsers)`; what it runs imports the model stack lazily.
_COMMANDS = (
    "effllm.server.cli",
    "effllm.server.calibrate",
    "effllm.client.cli",
    "effllm.client.chat",
    "effllm.client.adapters_cli",
    "effllm.telemetry.cli",
    "effllm.loadtest.cli",
    "effllm.tuner.cli",
    "effllm.cli.bench",
    "effllm.cli.models",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="effllm", description="serve, tune and load-test efficient LLMs")
    sub = parser.add_subparsers(dest="command", required=True)
    for module in _COMMANDS:
        importlib.import_module(module).add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
