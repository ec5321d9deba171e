"""`effllm serve`: flags -> EngineArgs (server/engine_args.py builds the engines) + ServerConfig, then run
the server; with --replicas, the same server core per replica on Ray Serve (server/cluster/, imported only
then)."""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from dataclasses import dataclass, replace
from pathlib import Path

from ..common.auth import AuthConfig, TlsConfig, is_loopback, security_config
from ..common.auth import add_flags as add_security_flags
from ..telemetry.tracing import add_flags as add_telemetry_flags
from ..telemetry.tracing import config_from_args as telemetry_config
from ..telemetry.tracing import default_run_dir
from . import lifeline
from .adapters.registry import AdapterRegistry, RegistryConfig
from .app import ServerConfig, serve
from .cluster.placement import parse_replicas
from .defaults import SamplingDefaults, has_chat_template, load_sampling_defaults
from .engine_args import EngineArgs, build_engines, models_with_variants
from .engines import compile_cache
from .engines.base import AdapterHost, Engine
from .faults import maybe_inject
from .logs import route_transformers
from .logs import setup as setup_logging
from .models import HostedModel
from .router import OBJECTIVES
from .service import Limits
from .variants import VariantAdapters

# The flags' defaults are the Limits defaults: one source of truth (a request limit seen through the CLI
# and through ServerConfig() is the same number).
_LIMITS = Limits()
DEFAULT_MAX_NEW_TOKENS = _LIMITS.default_max_new_tokens  # when neither the flag nor the model sets one
log = logging.getLogger("effllm.server")


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "serve", help="serve a model over gRPC", formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    add_serve_flags(p)
    add_cluster_flags(p)
    p.set_defaults(func=run)


def add_serve_flags(p: argparse.ArgumentParser) -> None:
    """Every `effllm serve` flag (`effllm calibrate` takes them too, to measure what this server hosts):
    the engine flags come from EngineArgs (server/engine_args.py), the server's own are here."""
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=50051)
    adapters = EngineArgs.add_cli_args(p)
    p.add_argument(
        "--default-objective",
        choices=OBJECTIVES,
        default="latency",
        help="the objective of a request that names none (latency: what a server without variants gives)",
    )
    p.add_argument(
        "--explore-share",
        type=float,
        default=ServerConfig.explore_share,
        help="with several variants: at most this share of requests goes to the variant whose figures are "
        "stalest, so a bad figure corrects itself from served traffic (0: off)",
    )
    p.add_argument(
        "--queue-size", type=int, default=256, help="requests waiting for a slot before RESOURCE_EXHAUSTED"
    )
    p.add_argument(
        "--max-new-tokens",
        type=int,
        default=_LIMITS.max_new_tokens,
        help="largest max_new_tokens a request may ask",
    )
    p.add_argument(
        "--default-max-new-tokens",
        type=int,
        default=None,
        help="max_new_tokens of a request that sets none; default: the model's generation_config.json "
        f"max_new_tokens, else {DEFAULT_MAX_NEW_TOKENS}",
    )
    lim = p.add_argument_group("limits (a request over one is refused at once, naming it)")
    lim.add_argument(
        "--max-prompt-tokens",
        type=int,
        default=_LIMITS.max_prompt_tokens,
        help="rendered prompt tokens; 0: the context minus max_new_tokens",
    )
    lim.add_argument(
        "--max-prompt-chars",
        type=int,
        default=_LIMITS.max_prompt_chars,
        help="prompt characters, before tokenizing",
    )
    lim.add_argument(
        "--max-request-seconds",
        type=float,
        default=_LIMITS.max_request_s,
        help="cap on any request's run time, whatever deadline the client sent",
    )
    lim.add_argument(
        "--max-message-mib",
        type=float,
        default=16.0,
        help="largest gRPC message either way (gRPC's own default is 4 MiB)",
    )
    add_security_flags(p)
    p.add_argument("--grace", type=float, default=30.0, help="seconds in-flight requests get on SIGTERM")
    p.add_argument(
        "--log-level",
        default=None,
        help="show every library's records from this level on the console too (DEBUG, INFO, ...); "
        "default: effllm's own lines only, the rest in RUN_DIR/server.log",
    )
    p.add_argument("-v", "--verbose", action="count", default=0, help="-v: --log-level INFO; -vv: DEBUG")
    adapters.add_argument(
        "--adapter-unload-wait",
        type=float,
        default=30.0,
        help="seconds an unload waits for in-flight requests by default",
    )
    adapters.add_argument(
        "--preload",
        action="append",
        default=[],
        metavar="[MODEL:]NAME[@VERSION]",
        help="adapter to load before serving (repeatable); MODEL: for a --model other than the first",
    )
    add_telemetry_flags(p)


def add_cluster_flags(p: argparse.ArgumentParser) -> None:
    """`effllm serve`'s own (not `effllm calibrate`'s): the Ray Serve cluster (server/cluster/)."""
    c = p.add_argument_group("cluster (Ray Serve; needs the ray extra: pip install -e '.[ray]')")
    c.add_argument(
        "--replicas",
        default=None,
        metavar="N|MIN:MAX",
        help="serve N replicas of this server (MIN:MAX: autoscale on ongoing requests) behind one address "
        "on Ray Serve; none: one server, and Ray is never imported",
    )
    c.add_argument(
        "--ray-address",
        default=None,
        help="join this Ray cluster (started with `ray start --head`); default: start a local one, capped, "
        "and stop it on exit",
    )
    c.add_argument(
        "--attach",
        action="store_true",
        help="with --ray-address: serve the replicas a RayService already deployed (serveConfigV2 "
        "import_path effllm.server.cluster.launch:build_app); neither deploy nor delete them",
    )
    c.add_argument("--replica-cpus", type=float, default=1.0, help="CPUs Ray reserves for each replica")
    c.add_argument("--replica-gpus", type=float, default=0.0, help="GPUs Ray reserves for each replica")
    c.add_argument(
        "--ray-cpus", type=int, default=None, help="local cluster: CPUs it may use; default: this host's"
    )


def build_registry(args: EngineArgs, unload_wait_s: float, engine: AdapterHost) -> AdapterRegistry:
    root = args.adapter_root
    if root is not None:
        root = root.expanduser().resolve()
        if not root.is_dir():
            raise SystemExit(f"--adapter-root {args.adapter_root}: not a folder")
    model = getattr(engine, "model", None)  # ResolvedModel on both engines
    config = RegistryConfig(
        root=root,
        max_resident=args.max_adapters_resident,
        max_rank=args.max_adapter_rank,
        unload_wait_s=unload_wait_s,
    )
    return AdapterRegistry(engine, model.path if model is not None else None, config)


def run(args: argparse.Namespace) -> int:
    try:
        telemetry = telemetry_config(args, service_name="effllm-server")
    except ValueError as err:
        print(f"effllm serve: {err}", file=sys.stderr)
        return 2
    run_dir = Path(telemetry.run_dir or default_run_dir("serve"))
    try:
        log_file = setup_logging(run_dir, args.log_level, args.verbose)
    except (ValueError, OSError) as err:
        print(f"effllm serve: {err}", file=sys.stderr)
        return 2
    telemetry = replace(telemetry, run_dir=run_dir)
    compile_cache.persist()  # before torch: Inductor's kernels kept under the effllm cache dir
    try:
        auth, tls = security_config(args)
        if telemetry.prometheus_port is not None and not is_loopback(telemetry.prometheus_host):
            log.warning(
                "--prometheus-host %s: /metrics is served without auth or TLS (see docs/security.md)",
                telemetry.prometheus_host,
            )
        if args.replicas:
            replicas = parse_replicas(args.replicas)
            if args.attach and not args.ray_address:
                raise ValueError("--attach: give --ray-address, the cluster whose application to serve")
        else:
            lifeline.install()  # before the engine forks its core: children die with us, even on SIGKILL
            core = assemble(args, auth, tls)
            engine_args, engines = core.engine_args, core.engines
            config, defaults = core.config, core.defaults
            engine = engines[0]
            host: AdapterHost = engine if len(engines) == 1 else VariantAdapters(engines)
    except (ValueError, OSError) as err:
        log.error("bad configuration: %s", err)
        return 2
    if args.replicas:  # Ray is imported only here, and only when asked for
        from .cluster.launch import run_cluster

        return run_cluster(args, replicas, auth, tls, telemetry)
    info = engine.info
    log.info(
        "model %s (%s engine, %s on %s); run dir %s (log: %s)",
        info.model,
        info.engine,
        info.precision,
        info.device,
        run_dir,
        log_file.name,
    )
    log.info(
        "sampling defaults: temperature %g, top_p %g, top_k %d, repetition_penalty %g, "
        "max_new_tokens %d (%s)",
        defaults.temperature,
        defaults.top_p,
        defaults.top_k,
        defaults.repetition_penalty,
        config.limits.default_max_new_tokens,
        "from generation_config.json: " + ", ".join(defaults.from_model)
        if defaults.from_model
        else "the model's generation_config.json sets none",
    )
    route_transformers()
    if len(engines) > 1:
        log.info(
            "variants: %s (default objective %s)",
            ", ".join(f"{e.info.precision}:{e.info.engine}" for e in engines),
            args.default_objective,
        )
    if core.more:
        log.info(
            "models: %s (a request naming none runs on the first)",
            ", ".join([core.name or info.model, *(m.name for m in core.more)]),
        )
    registry = build_registry(engine_args, args.adapter_unload_wait, host)
    return asyncio.run(serve(engines, config, registry, telemetry, name=core.name, more=core.more))


@dataclass
class Core:
    """One server core as the flags describe it (engines not started): the first --model's EngineArgs,
    engines, sampling defaults and name, the ServerConfig, and every further --model (HostedModel)."""

    engine_args: EngineArgs
    engines: list[Engine]
    config: ServerConfig
    defaults: SamplingDefaults
    name: str
    more: list[HostedModel]


def assemble(args: argparse.Namespace, auth: AuthConfig, tls: TlsConfig | None) -> Core:
    """The engines (not started) and the ServerConfig the flags describe: one server core, whether it runs
    alone or as a cluster replica (cluster/replica.py builds its own with this). Raises ValueError/OSError
    naming the bad flag."""
    per_model = models_with_variants(EngineArgs.from_cli_args(args))  # one (name, EngineArgs) per --model
    name, engine_args = per_model[0]
    engines = [maybe_inject(e) for e in build_engines(engine_args)]
    model = getattr(engines[0], "model", None)  # ResolvedModel on both engines
    model_dir = model.path if model is not None else None
    defaults = load_sampling_defaults(model_dir)
    more = [
        _hosted(n, [maybe_inject(e) for e in build_engines(a)], a, args.adapter_unload_wait)
        for n, a in per_model[1:]
    ]
    default_max_new = args.default_max_new_tokens or defaults.max_new_tokens or DEFAULT_MAX_NEW_TOKENS
    config = ServerConfig(
        host=args.host,
        port=args.port,
        max_concurrency=engine_args.max_concurrency,
        queue_size=args.queue_size,
        max_message_bytes=int(args.max_message_mib * (1 << 20)),
        grace_s=args.grace,
        limits=Limits(
            default_max_new_tokens=default_max_new,
            max_new_tokens=args.max_new_tokens,
            max_prompt_chars=args.max_prompt_chars,
            max_prompt_tokens=args.max_prompt_tokens,
            max_request_s=args.max_request_seconds,
        ),
        auth=auth,
        tls=tls,
        preload=tuple(args.preload),
        sampling_defaults=defaults,
        chat_template=has_chat_template(model_dir),
        default_objective=args.default_objective,
        watts_per_core=args.watts_per_core,
        explore_share=args.explore_share,
        stream_interval=engine_args.stream_interval,
    )
    return Core(engine_args, engines, config, defaults, name, more)


def _hosted(name: str, engines: list[Engine], args: EngineArgs, unload_wait_s: float) -> HostedModel:
    """A second or later --model: its engines, its own registry over the one adapter root, its own
    sampling defaults and chat template (the checkpoint's)."""
    host: AdapterHost = engines[0] if len(engines) == 1 else VariantAdapters(engines)
    model = getattr(engines[0], "model", None)
    model_dir = model.path if model is not None else None
    return HostedModel(
        tuple(engines),
        name,
        build_registry(args, unload_wait_s, host),
        sampling_defaults=load_sampling_defaults(model_dir),
        chat_template=has_chat_template(model_dir),
        max_concurrency=args.max_concurrency,
    )
