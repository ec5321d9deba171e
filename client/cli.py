"""`effllm generate`: send a prompt or a chat turn, stream the answer to the terminal."""

from __future__ import annotations

import argparse
import sys

import grpc

from .client import EffllmClient


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("generate", help="generate text from a running server")
    p.add_argument("prompt", nargs="?", help="raw prompt (or use --chat, or stdin with -)")
    p.add_argument(
        "--chat",
        action="append",
        metavar="[ROLE:]TEXT",
        help="a chat turn, rendered with the model's chat template; repeat for several (role: user)",
    )
    p.add_argument("--target", default="127.0.0.1:50051")
    p.add_argument("--adapter", default="")
    p.add_argument("--max-new-tokens", type=int, default=0)
    p.add_argument("--temperature", type=float, default=None)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--stop", action="append", default=[])
    p.add_argument("--no-stream", action="store_true", help="one unary call instead of streaming")
    p.add_argument("--timeout", type=float, default=120.0)
    p.add_argument("--wait", type=float, default=0.0, help="wait up to N s for the server to be SERVING")
    p.set_defaults(func=run)


def _turns(chat: list[str]) -> list[tuple[str, str]]:
    turns = []
    for item in chat:
        role, sep, text = item.partition(":")
        turns.append(
            (role, text.lstrip()) if sep and role in ("system", "user", "assistant") else ("user", item)
        )
    return turns


def run(args: argparse.Namespace) -> int:
    prompt = sys.stdin.read() if args.prompt == "-" else args.prompt
    if (prompt is None) == (not args.chat):
        print("give a prompt or --chat (not both)", file=sys.stderr)
        return 2
    kw = dict(
        messages=_turns(args.chat) if args.chat else None,
        adapter=args.adapter,
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        seed=args.seed,
        stop=args.stop,
    )
    with EffllmClient(args.target, timeout=args.timeout) as client:
        try:
            if args.wait:
                client.wait_ready(args.wait)
            if args.no_stream:
                reply = client.generate(prompt, **kw)
                print(reply.text)
                final = reply
            else:
                for chunk in client.stream(prompt, **kw):
                    print(chunk.text, end="", flush=True)
                    if chunk.HasField("final"):
                        final = chunk.final  # type: ignore[assignment]
                print()
        except grpc.RpcError as err:
            print(f"error: {err.code().name}: {err.details()}", file=sys.stderr)
            return 1
    u, t = final.usage, final.timings
    print(
        f"[{u.input_tokens} prompt + {u.output_tokens} new tokens; "
        f"ttft {t.time_to_first_token_s * 1e3:.0f} ms, total {t.total_s:.2f} s]",
        file=sys.stderr,
    )
    return 0
