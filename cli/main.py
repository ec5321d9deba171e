"""`effllm`: a thin dispatcher; each package owns its subcommands (see shared/DESIGN.md)."""

from __future__ import annotations

import argparse
import importlib
import sys

# (module, needs the model stack) — imported lazily so `effllm generate` never imports torch.
_COMMANDS = (
    "effllm.server.cli",
    "effllm.client.cli",
    "effllm.client.chat",
    "effllm.client.adapters_cli",
    "effllm.telemetry.cli",
    "effllm.loadtest.cli",
    "effllm.tuner.cli",
    "effllm.cli.bench",
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
