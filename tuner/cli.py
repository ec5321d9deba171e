"""`effllm tune` (a YAML config and/or flags -> TuneConfig -> one run) and `effllm tuner serve|bench|tasks`.

Every TuneConfig field is a flag (--rank 16, --target-modules q_proj,v_proj); flags override the YAML file.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from dataclasses import MISSING, fields
from pathlib import Path
from typing import Any

import grpc

from effllm.common.auth import ENV_ADMIN, AuthConfig, security_config
from effllm.common.auth import add_flags as add_security_flags

from .config import METHODS, ConfigError, TuneConfig
from .limits import TunerLimits

_HELP = {
    "method": f"one of {', '.join(METHODS)}",
    "data": "JSONL path, task:NAME (built-in: see `effllm tuner tasks`) or hf:ID[:SPLIT] (a hub dataset id)",
    "model": "local HF dir or hub id; default: the embedded SmolLM2-135M-Instruct",
    "layers": "freeze: decoder layers that train, e.g. -2,-1",
    "max_steps": "optimizer steps; 0: run `epochs` over the data",
    "output_dir": "where the adapter/checkpoint goes (must not exist); default runs/tune/METHOD-TIME",
}


_LIMIT_HELP = {
    "max_running": "jobs training at once; the rest wait",
    "max_jobs": "jobs queued or running; SubmitJob past it: RESOURCE_EXHAUSTED",
    "max_finished_jobs": "finished jobs kept for WatchJob/ListJobs (oldest forgotten first; files stay)",
    "finished_job_ttl_s": "seconds a finished job is kept",
    "cancel_grace_s": "CancelJob: seconds from SIGTERM to SIGKILL",
    "memory_budget_mb": "data one job may hold: (n_train + n_eval) x (2 KiB + 80 B x max_length); "
    "0: half the memory available at submit",
    "max_steps": "upper bound of max_steps and warmup_steps",
    "max_length": "upper bound of max_length (pack_length: twice it)",
    "max_batch_tokens": "upper bound of batch_size x row length (max_length, or pack_length when packing)",
    "max_list_items": "upper bound of the length of target_modules and layers",
}


def _add_config_flags(p: argparse.ArgumentParser) -> None:
    for f in fields(TuneConfig):
        default = f.default if f.default is not MISSING else None
        shown = ",".join(map(str, default)) if isinstance(default, tuple) else default
        p.add_argument(
            "--" + f.name.replace("_", "-"),
            dest=f.name,
            default=None,
            metavar=f.name.upper(),
            help=f"{_HELP.get(f.name, '')} (default: {shown})".strip(),
        )


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("tune", help="fine-tune with LoRA, LoRA+, rsLoRA, DoRA, freezing or full tuning")
    p.add_argument("config", nargs="?", help="YAML file with TuneConfig keys; flags override it")
    _add_config_flags(p)
    p.add_argument("--publish", metavar="SERVER", help="host:port of a running server: publish + LoadAdapter")
    p.add_argument("--name", help="adapter name to publish under")
    p.add_argument("--adapter-root", help="the server's adapter root (default: $EFFLLM_ADAPTER_ROOT)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run_tune)

    t = sub.add_parser("tuner", help="the tuning service and benchmarks")
    tsub = t.add_subparsers(dest="tuner_command", required=True)
    s = tsub.add_parser("serve", help="serve TuningService over gRPC (jobs run in child processes)")
    s.add_argument("--host", default="127.0.0.1", help="loopback unless told otherwise")
    s.add_argument("--port", type=int, default=50061)
    s.add_argument("--log-dir", default="runs/tuner", help="one folder per job (log, default output)")
    r = s.add_argument_group("roots: every path in a job must resolve inside its root (links followed)")
    r.add_argument("--data-root", default=".", help="data, eval_data and model paths")
    r.add_argument("--output-root", default="runs/tune", help="output_dir paths (created if missing)")
    r.add_argument("--adapter-root", default=None, help="publish.adapter_root paths; none: no publishing")
    r.add_argument(
        "--allow-hub-data",
        action="store_true",
        help="accept data/eval_data hf:ID (a hub dataset id, fetched for the caller); off: refused",
    )
    lim = s.add_argument_group("limits: jobs held and kept, and the size of one job (past one: refused)")
    for f in fields(TunerLimits):
        what = _LIMIT_HELP.get(f.name, f"upper bound of a job field, {f.name[4:]}")
        lim.add_argument(
            "--" + f.name.replace("_", "-"),
            dest=f.name,
            type=type(f.default),
            default=f.default,
            metavar=type(f.default).__name__.upper(),
            help=f"{what} (default: {f.default})",
        )
    pub = s.add_argument_group("publishing (with the tuner's own credentials)")
    pub.add_argument(
        "--publish-server",
        action="append",
        default=[],
        metavar="NAME=HOST:PORT",
        help="a server jobs may publish to, by NAME (repeatable); jobs cannot name an address",
    )
    pub.add_argument(
        "--publish-token-file",
        type=Path,
        default=None,
        help="admin token for those servers (its first line: `TOKEN` or `admin TOKEN`); "
        "default: this tuner's own admin token",
    )
    pub.add_argument("--publish-ca", type=Path, default=None, help="CA (PEM) of those servers: TLS")
    pub.add_argument("--publish-cert", type=Path, default=None, help="client certificate (PEM): mutual TLS")
    pub.add_argument("--publish-key", type=Path, default=None, help="client key (PEM): mutual TLS")
    add_security_flags(s, generate_role=False)
    s.set_defaults(func=run_serve)
    k = tsub.add_parser("tasks", help="list the built-in synthetic tasks")
    k.set_defaults(func=run_tasks)


def config_from_args(args: argparse.Namespace) -> TuneConfig:
    overrides: dict[str, Any] = {
        f.name: getattr(args, f.name) for f in fields(TuneConfig) if getattr(args, f.name, None) is not None
    }
    if args.config:
        return TuneConfig.from_yaml(args.config, overrides)
    return TuneConfig.from_dict(overrides)


def run_tune(args: argparse.Namespace) -> int:
    from .publish import default_adapter_root
    from .worker import PublishTarget, execute

    logging.basicConfig(level=logging.WARNING)
    try:
        config = config_from_args(args)
        target = None
        if args.publish or args.name:
            if not (args.publish and args.name):
                raise ConfigError("publish: --publish SERVER and --name NAME go together")
            root = args.adapter_root or default_adapter_root()
            target = PublishTarget(args.publish, args.name, str(root or ""))
        done = execute(config, publish=target, progress_bar=not args.no_progress)
    except (ConfigError, ValueError, FileExistsError) as exc:
        print(f"effllm tune: {exc}", file=sys.stderr)
        return 2
    except grpc.RpcError as exc:  # the adapter is on disk; the server refused or could not be reached
        print(f"effllm tune: LoadAdapter failed: {exc.code().name}: {exc.details()}", file=sys.stderr)
        return 1
    m = done.metrics
    before, after = m.get("eval_before") or {}, m.get("eval_after") or {}
    print(f"saved {done.output_dir}" + (f"; published {done.published}" if done.published else ""))
    print(
        f"trainable {m['params']['trainable']:,} ({m['params']['trainable_percent']:.3f} %)  "
        f"loss {m['train_loss_first']:.4f} -> {m['train_loss_last']:.4f}  "
        f"held-out exact match {_fmt(before.get('exact_match'))} -> {_fmt(after.get('exact_match'))}  "
        f"{m['samples_per_s']:.2f} samples/s  energy {m['energy']['joules']:.0f} J ({m['energy']['source']})"
    )
    return 0


def _fmt(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.3f}"


def run_serve(args: argparse.Namespace) -> int:
    import asyncio

    from .policy import TunerPolicy
    from .service import serve

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        auth, tls = security_config(args)
        Path(args.output_root).mkdir(parents=True, exist_ok=True)
        policy = TunerPolicy.create(
            args.data_root,
            args.output_root,
            args.adapter_root,
            tuple(args.publish_server),
            hub_data=args.allow_hub_data,
        )
        limits = TunerLimits(**{f.name: getattr(args, f.name) for f in fields(TunerLimits)})
        publish_tls, worker_env = _publish_credentials(args, auth)
    except (ValueError, OSError) as err:
        logging.getLogger("effllm.tuner").error("bad configuration: %s", err)
        return 2
    asyncio.run(
        serve(
            args.host,
            args.port,
            policy,
            limits=limits,
            log_dir=args.log_dir,
            auth=auth,
            tls=tls,
            publish_tls=publish_tls,
            worker_env=worker_env,
        )
    )
    return 0


def _publish_credentials(args: argparse.Namespace, auth: AuthConfig) -> tuple[dict[str, str], dict[str, str]]:
    """(PEM paths for the job spec, the worker's environment): the token travels in the environment,
    which only the tuner's user can read, never on a command line that `ps` shows everyone."""
    if (args.publish_cert is None) != (args.publish_key is None):
        raise ValueError("--publish-cert and --publish-key go together")
    tls = {
        key: str(path.resolve())
        for key, path in (
            ("tls_ca", args.publish_ca),
            ("tls_cert", args.publish_cert),
            ("tls_key", args.publish_key),
        )
        if path is not None
    }
    token = None
    if args.publish_token_file is not None:
        words = [ln.split("#", 1)[0].split() for ln in args.publish_token_file.read_text().splitlines()]
        token = next((w[-1] for w in words if w), None)
        if token is None:
            raise ValueError(f"--publish-token-file {args.publish_token_file}: no token in it")
    else:
        token = next((t for role, t in auth.tokens if role == "admin"), None)
    return tls, ({ENV_ADMIN: token} if token else {})


def run_tasks(args: argparse.Namespace) -> int:
    from .tasks import TASKS, generate

    for task in TASKS.values():
        train, _ = generate(task.name, 1, 0)
        print(f"task:{task.name:16s} {task.description}\n    e.g. {json.dumps(train[0]['messages'])}")
    return 0
