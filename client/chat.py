"""`effllm chat`: an interactive chat in the terminal with a running server.

Each turn streams the reply as it is generated; the whole conversation is sent every turn (the server
keeps no state). Ctrl-C while a reply streams cancels that reply (the RPC is cancelled, the server frees
the slot) and the session goes on; Ctrl-C at the prompt clears the line; Ctrl-D or /exit ends the session.
/reset forgets the conversation. Invariant: a cancelled or failed turn leaves the history as it was.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

import grpc

from .cli import add_sampling_args, add_target_args, client_from_args, sampling_from_args
from .client import EffllmClient

PROMPT = "you> "
HELP = "Ctrl-C cancels a reply, Ctrl-D or /exit ends, /reset forgets the conversation"


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("chat", help="chat with a running server in the terminal")
    add_target_args(p)
    p.add_argument("--adapter", default="")
    p.add_argument("--system", default=None, help="a system message that opens the conversation")
    add_sampling_args(p)
    p.set_defaults(func=run)


def chat_loop(
    client: EffllmClient,
    send_kw: dict[str, object],
    system: str | None = None,
    read: Callable[[str], str] = input,
) -> int:
    history: list[tuple[str, str]] = [("system", system)] if system else []
    print(HELP, flush=True)
    while True:
        try:
            line = read(PROMPT)
        except EOFError:
            print()
            return 0
        except KeyboardInterrupt:
            print()
            continue
        text = line.strip()
        if not text:
            continue
        if text in ("/exit", "/quit"):
            return 0
        if text == "/reset":
            history = history[:1] if system else []
            print("(conversation forgotten)", flush=True)
            continue
        turns = [*history, ("user", line)]
        reply: list[str] = []
        try:
            for chunk in client.stream(messages=turns, **send_kw):  # type: ignore[arg-type]
                print(chunk.text, end="", flush=True)
                reply.append(chunk.text)
            print(flush=True)
        except KeyboardInterrupt:
            print(" [cancelled]", flush=True)  # the stream's generator cancelled the call on its way out
            continue
        except grpc.RpcError as err:
            print(f"\nerror: {err.code().name}: {err.details()}", file=sys.stderr, flush=True)
            continue
        history = [*turns, ("assistant", "".join(reply))]


def run(args: argparse.Namespace) -> int:
    client = client_from_args(args)
    if client is None:
        return 2
    with client:
        try:
            if args.wait:
                client.wait_ready(args.wait)
            info = client.model_info()
        except grpc.RpcError as err:
            print(f"error: {err.code().name}: {err.details()}", file=sys.stderr)
            return 1
        if not info.chat_template:
            print(f"note: {info.model} has no chat template; turns are rendered plainly", file=sys.stderr)
        send_kw = {"adapter": args.adapter, **sampling_from_args(args)}
        return chat_loop(client, send_kw, args.system)
