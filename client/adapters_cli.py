"""`effllm adapters list|load|unload|pin`: manage the adapters resident in a running server.

Invariant: the target, TLS and token flags (and $EFFLLM_AUTH_TOKEN) are `effllm generate`'s own
(client/cli.py `add_security_args` / `security_from_args`): an operator reaches a server with auth the
same way with every client command."""

from __future__ import annotations

import argparse
import datetime as dt
import json
import sys

import grpc
from google.protobuf.json_format import MessageToDict

from ..api.v1 import adapters_pb2 as apb
from .cli import add_security_args, client_from_args


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("adapters", help="list, load, unload or pin adapters on a running server")
    p.add_argument("--target", default="127.0.0.1:50051")
    add_security_args(p)
    p.add_argument("--timeout", type=float, default=120.0)
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.add_argument(
        "--model",
        default=None,
        help="the base model whose adapters these are, on a server hosting several (default: its first)",
    )
    verbs = p.add_subparsers(dest="verb", required=True)
    verbs.add_parser("list", help="resident adapters and their statistics")
    load = verbs.add_parser("load", help="load ROOT/NAME/VERSION (or --path) into the server")
    load.add_argument("ref", metavar="NAME[@VERSION]")
    load.add_argument(
        "--path", default="", help="a folder relative to the adapter root instead of NAME/VERSION"
    )
    unload = verbs.add_parser("unload", help="unload NAME (every version) or NAME@VERSION")
    unload.add_argument("ref", metavar="NAME[@VERSION]")
    unload.add_argument("--wait", type=float, default=0.0, help="seconds to wait for in-flight requests")
    pin = verbs.add_parser("pin", help="pin NAME[@VERSION] (the latest by default) against eviction/unload")
    pin.add_argument("ref", metavar="NAME[@VERSION]")
    pin.add_argument("--off", action="store_true", help="unpin instead")
    p.set_defaults(func=run)


def _split(ref: str) -> tuple[str, str]:
    name, _, version = ref.partition("@")
    return name, version


def format_table(adapters: list[apb.AdapterInfo]) -> str:
    head = (
        "adapter",
        "method",
        "rank",
        "alpha",
        "where",
        "pinned",
        "latest",
        "load_s",
        "served",
        "in_flight",
        "last_used",
    )
    rows = [head]
    for a in adapters:
        last = dt.datetime.fromtimestamp(a.last_used_unix).strftime("%H:%M:%S") if a.last_used_unix else "-"
        rows.append(
            (
                f"{a.name}@{a.version}",
                a.method,
                str(a.rank),
                f"{a.alpha:g}",
                a.residency,
                "yes" if a.pinned else "",
                "yes" if a.latest else "",
                f"{a.load_s:.3f}",
                str(a.requests_served),
                str(a.in_flight),
                last,
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows)


def _show(args: argparse.Namespace, adapters: list[apb.AdapterInfo]) -> None:
    if args.json:
        print(json.dumps([MessageToDict(a, preserving_proto_field_name=True) for a in adapters], indent=2))
    else:
        print(format_table(adapters) if adapters else "no adapters loaded")


def run(args: argparse.Namespace) -> int:
    client = client_from_args(args)
    if client is None:
        return 2
    with client:
        try:
            if args.verb == "list":
                _show(args, client.list_adapters(model=args.model))
            elif args.verb == "load":
                name, version = _split(args.ref)
                _show(args, [client.load_adapter(name, version, path=args.path, model=args.model)])
            elif args.verb == "unload":
                name, version = _split(args.ref)
                for key in client.unload_adapter(name, version, wait_s=args.wait, model=args.model):
                    print(f"unloaded {key}")
            else:
                name, version = _split(args.ref)
                _show(args, [client.pin_adapter(name, version, pinned=not args.off, model=args.model)])
        except grpc.RpcError as err:
            print(f"error: {err.code().name}: {err.details()}", file=sys.stderr)
            return 1
    return 0
