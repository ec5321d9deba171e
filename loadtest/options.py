"""effllm's workload options as Locust custom arguments, for `locust -f loadtest/user.py --host HOST:PORT`.

`add_options` registers `--effllm-*` flags on Locust's parser (shown in the web UI's start form too);
`config_from_options` turns the parsed options (and Locust's host and user count) into the same
LoadConfig that `effllm load` passes whole through EFFLLM_LOAD_CONFIG. Pure: no locust import here, so
the mapping is tested without starting Locust. Invariant: a bad option value raises ValueError naming
the flag.
"""

from __future__ import annotations

import argparse
from typing import Any

from .cli import workload_from_args
from .config import LoadConfig

PREFIX = "effllm_"
UNBOUNDED_S = 10.0**9  # no own end: Locust's --run-time (or the web UI's stop button) ends the test

# (flag, type, default, help); every flag is `--effllm-<name>` and lands as `effllm_<name>`.
OPTIONS: tuple[tuple[str, type, Any, str], ...] = (
    ("rate", float, 0.0, "open loop: req/s over all users (0: closed loop, one request per user at a time)"),
    ("think", float, 0.0, "closed loop: seconds between a user's requests"),
    ("arrivals", str, "poisson", "open loop arrivals: poisson or gamma"),
    ("burstiness", float, 1.0, "gamma shape: 1 = Poisson, < 1 burstier"),
    ("prompt-len", str, "32", "prompt tokens: N, uniform:LO-HI, normal:M,S, lognormal:M,SIGMA"),
    ("output-len", str, "32", "max new tokens, same forms as --effllm-prompt-len"),
    ("prompts", str, "", 'JSONL file of {"prompt"} or {"messages"} lines (instead of synthetic prompts)'),
    ("chat-share", float, 0.0, "share of synthetic requests sent as chat turns"),
    ("temperature", float, 0.0, "sampling temperature (0: greedy)"),
    ("ignore-eos", bool, False, "decode exactly the drawn output length"),
    ("adapters", str, "", "comma-separated adapter names (rank order for zipf)"),
    ("popularity", str, "uniform", "adapter popularity: uniform, zipf or round_robin"),
    ("zipf-alpha", float, 1.0, "zipf exponent"),
    ("base-share", float, 0.0, "share of requests for the base model"),
    ("objectives", str, "", "objective mix by weight, e.g. latency=0.4,energy=0.4,quality=0.2"),
    ("models", str, "", "base-model mix by weight on a server hosting several, e.g. a=0.7,b=0.3"),
    ("budget", str, "", "limits on every request: max_ttft_s, max_tpot_s, max_j_per_token, min_quality"),
    ("seed", int, 0, "workload seed (prompts, lengths, arrivals)"),
    ("timeout", float, 120.0, "gRPC deadline per request (s)"),
    ("duration", float, 0.0, "seconds of arrivals (0: until Locust stops the test)"),
    ("no-stream", bool, False, "unary Generate (no TTFT/TPOT/ITL) instead of GenerateStream"),
    ("run-dir", str, "", "also write effllm's per-request rows (requests-*.jsonl) to this folder"),
)


def add_options(parser: Any) -> None:
    """Register the `--effllm-*` flags on Locust's (configargparse) parser, shown in the web UI."""
    for name, kind, default, text in OPTIONS:
        flag = f"--effllm-{name}"
        if kind is bool:
            parser.add_argument(flag, action="store_true", default=default, help=text, include_in_web_ui=True)
        else:
            parser.add_argument(flag, type=kind, default=default, help=text, include_in_web_ui=True)


def _get(options: Any, name: str, kind: type, default: Any) -> Any:
    value = getattr(options, PREFIX + name.replace("-", "_"), default)
    if value is None or value == "":
        return default
    try:
        if kind is bool:
            return value if isinstance(value, bool) else str(value).lower() in ("1", "true", "on", "yes")
        return kind(value)
    except (TypeError, ValueError) as err:
        raise ValueError(f"--effllm-{name} {value!r}: {err}") from err


def targets_from_host(host: str | None) -> tuple[str, ...]:
    """Locust's --host (or the web UI's host field): HOST:PORT or several, comma-separated; a scheme such
    as grpc:// or http:// is dropped."""
    out = []
    for part in (host or "").split(","):
        part = part.strip().rstrip("/")
        if "://" in part:
            part = part.split("://", 1)[1]
        if part:
            out.append(part)
    if not out:
        raise ValueError("--host: give the effllm server as HOST:PORT (several: comma-separated)")
    return tuple(out)


def config_from_options(options: Any, host: str | None, users: int | None) -> LoadConfig:
    """The LoadConfig for a standalone Locust run: workload from the `--effllm-*` options, targets from
    the host, closed-loop users from Locust's user count."""
    v = {name: _get(options, name, kind, default) for name, kind, default, _ in OPTIONS}
    rate = v["rate"] if v["rate"] > 0 else None
    ns = argparse.Namespace(
        rate=rate,
        users=None if rate else max(1, int(users or 1)),
        think=v["think"],
        arrivals=v["arrivals"],
        burstiness=v["burstiness"],
        shape="constant",
        shape_start=None,
        shape_end=None,
        duration=v["duration"] or UNBOUNDED_S,
        step_s=10.0,
        seed=v["seed"],
        prompt_len=v["prompt-len"],
        output_len=v["output-len"],
        prompts=v["prompts"] or None,
        chat_share=v["chat-share"],
        temperature=v["temperature"],
        ignore_eos=v["ignore-eos"],
        adapters=v["adapters"],
        popularity=v["popularity"],
        zipf_alpha=v["zipf-alpha"],
        base_share=v["base-share"],
        objectives=v["objectives"],
        budget=v["budget"],
        models=v["models"],
        flag_prefix="--effllm-",  # errors name the flag as Locust shows it
    )
    return LoadConfig(
        targets=targets_from_host(host),
        workload=workload_from_args(ns),
        duration_s=v["duration"] or UNBOUNDED_S,
        timeout_s=v["timeout"],
        run_dir=v["run-dir"],
        stream=not v["no-stream"],
    )
