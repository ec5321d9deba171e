"""`effllm generate`: ask one question, stream the answer to the terminal.

A prompt goes as a user chat turn when the model has a chat template (GetModelInfo says so), as a raw
completion prompt with --raw; sampling flags not given are left unset (the model's defaults).
The target, security and sampling flags are shared with `effllm chat` (client/chat.py)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import grpc

from ..api.objectives import OBJECTIVES
from .channel import ClientSecurity
from .client import EffllmClient


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "generate",
        help="ask a running server one question (a chat turn when the model has a chat template)",
    )
    p.add_argument(
        "prompt",
        nargs="?",
        help="what to ask (`-`: read stdin); sent as a user chat turn when the model has a chat "
        "template, as raw text with --raw",
    )
    p.add_argument("--raw", action="store_true", help="send the prompt as a raw completion prompt")
    p.add_argument("--system", default=None, help="a system message before the prompt (chat models)")
    p.add_argument(
        "--chat",
        action="append",
        metavar="[ROLE:]TEXT",
        help="chat turns given explicitly instead of a prompt; repeat for several (role: user)",
    )
    add_target_args(p)
    p.add_argument("--adapter", default="")
    p.add_argument(
        "--model",
        default=None,
        help="the base model to run on, on a server hosting several (GetModelInfo / ListModels name them; "
        "default: the server's first)",
    )
    p.add_argument(
        "--objective",
        choices=OBJECTIVES,
        default=None,
        help="what this request cares about; a server with several variants picks one by it "
        "(default: the server's --default-objective)",
    )
    add_sampling_args(p)
    p.add_argument("--no-stream", action="store_true", help="one unary call instead of streaming")
    p.set_defaults(func=run)


def add_target_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--target",
        default="127.0.0.1:50051",
        help="host:port, or several replicas as h1:p1,h2:p2 (round_robin with health checks)",
    )
    add_security_args(p)
    p.add_argument("--timeout", type=float, default=120.0)
    p.add_argument("--wait", type=float, default=0.0, help="wait up to N s for the server to be SERVING")


def add_sampling_args(p: argparse.ArgumentParser) -> None:
    """Sampling flags; one not given is left unset, so the server uses the model's default."""
    g = p.add_argument_group("sampling (default: the model's generation_config.json, see GetModelInfo)")
    g.add_argument("--max-new-tokens", type=int, default=None)
    g.add_argument("--temperature", type=float, default=None, help="0: greedy")
    g.add_argument("--top-p", type=float, default=None)
    g.add_argument("--top-k", type=int, default=None, help="0: off")
    g.add_argument("--repetition-penalty", type=float, default=None)
    g.add_argument("--seed", type=int, default=None)
    g.add_argument("--stop", action="append", default=[])


def sampling_from_args(args: argparse.Namespace) -> dict[str, Any]:
    return dict(
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        repetition_penalty=args.repetition_penalty,
        seed=args.seed,
        stop=args.stop,
    )


def add_security_args(p: argparse.ArgumentParser) -> None:
    """TLS / mutual TLS / token flags shared by the client subcommands (the token never as a flag value)."""
    g = p.add_argument_group("security")
    g.add_argument("--tls", action="store_true", help="TLS with the system's root certificates")
    g.add_argument("--root-cert", type=Path, default=None, help="CA (PEM) that signed the server certificate")
    g.add_argument("--client-cert", type=Path, default=None, help="client certificate (PEM): mutual TLS")
    g.add_argument("--client-key", type=Path, default=None, help="client private key (PEM)")
    g.add_argument(
        "--token-file",
        type=Path,
        default=None,
        help="file holding the bearer token (default: $EFFLLM_AUTH_TOKEN)",
    )
    g.add_argument("--server-name", default=None, help="name to expect in the server certificate")


def security_from_args(args: argparse.Namespace) -> ClientSecurity:
    return ClientSecurity.from_files(
        root_cert=args.root_cert,
        client_cert=args.client_cert,
        client_key=args.client_key,
        token_file=args.token_file,
        tls=args.tls,
        server_name=args.server_name,
    )


def client_from_args(args: argparse.Namespace) -> EffllmClient | None:
    """The client the target, security and timeout flags describe (every client command's way in); None,
    after saying why on stderr, when a TLS or token file cannot be read."""
    try:
        security = security_from_args(args)
    except (OSError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return None
    return EffllmClient(args.target, timeout=args.timeout, security=security)


def _turns(chat: list[str]) -> list[tuple[str, str]]:
    turns = []
    for item in chat:
        role, sep, text = item.partition(":")
        turns.append(
            (role, text.lstrip()) if sep and role in ("system", "user", "assistant") else ("user", item)
        )
    return turns


def _input(args: argparse.Namespace, client: EffllmClient) -> dict[str, Any]:
    """prompt= or messages= for build_request: explicit --chat turns; else the prompt as a user turn
    when the model has a chat template (and not --raw); else the prompt as raw text."""
    if args.chat:
        turns = _turns(args.chat)
        return {"messages": [("system", args.system), *turns] if args.system else turns}
    prompt = sys.stdin.read() if args.prompt == "-" else args.prompt
    if args.raw or not client.model_info(args.model).chat_template:
        return {"prompt": prompt}
    turns = [("user", prompt)]
    return {"messages": [("system", args.system), *turns] if args.system else turns}


def run(args: argparse.Namespace) -> int:
    if (args.prompt is None) == (not args.chat):
        print("give a prompt or --chat (not both)", file=sys.stderr)
        return 2
    if args.chat and args.raw:
        print("--raw sends a prompt, not --chat turns", file=sys.stderr)
        return 2
    client = client_from_args(args)
    if client is None:
        return 2
    with client:
        try:
            if args.wait:
                client.wait_ready(args.wait)
            kw = {**_input(args, client), "adapter": args.adapter, **sampling_from_args(args)}
            if args.objective:
                kw["objective"] = args.objective
            if args.model:
                kw["model"] = args.model
            if args.no_stream:
                reply = client.generate(**kw)
                print(reply.text)
                final = reply
            else:
                for chunk in client.stream(**kw):
                    print(chunk.text, end="", flush=True)
                    if chunk.HasField("final"):
                        final = chunk.final  # type: ignore[assignment]
                print()
        except grpc.RpcError as err:
            print(f"error: {err.code().name}: {err.details()}", file=sys.stderr)
            return 1
    u, t = final.usage, final.timings
    energy = f"; {u.energy_joules:.3g} J ({u.energy_source})" if u.HasField("energy_joules") else ""
    where = f" on {final.model + ' ' if final.model else ''}{final.variant}" if final.variant else ""
    print(
        f"[{u.input_tokens} prompt + {u.output_tokens} new tokens{where}; "
        f"ttft {t.time_to_first_token_s * 1e3:.0f} ms, total {t.total_s:.2f} s{energy}]",
        file=sys.stderr,
    )
    return 0
