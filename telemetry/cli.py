"""`effllm report TRACES.jsonl`: the per-adapter and overall table of a run, optionally as JSON."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .report import build_report, format_table, write_json


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "report",
        help="summarise a run's traces: latency, tokens/s, J/token, AMU, PCU, AEC",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("traces", type=Path, help="OTLP/JSON lines file (a run's traces.jsonl)")
    p.add_argument(
        "--samples",
        type=Path,
        default=None,
        help="resource-samples.jsonl (default: the one beside the trace file, if any)",
    )
    p.add_argument(
        "--json", type=Path, default=None, dest="json_out", help="also write the report as JSON here"
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if not args.traces.is_file():
        print(f"effllm report: {args.traces}: no such file", file=sys.stderr)
        return 2
    if args.samples is not None and not args.samples.is_file():
        print(f"effllm report: --samples {args.samples}: no such file", file=sys.stderr)
        return 2
    try:
        report = build_report(args.traces, args.samples)
    except ValueError as err:
        print(f"effllm report: {err}", file=sys.stderr)
        return 2
    if not report.groups:
        print(f"effllm report: {args.traces}: no generation spans (`generate MODEL`) in it", file=sys.stderr)
        return 1
    print(format_table(report))
    if args.json_out is not None:
        write_json(report, args.json_out)
        print(f"wrote {args.json_out}")
    return 0
