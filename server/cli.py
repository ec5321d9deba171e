"""`effllm serve`: flags -> ServerConfig + engine config, then run the server."""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any, cast

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
from .engines.base import PRECISIONS, AdapterHost, Engine, Precision
from .faults import maybe_inject
from .logs import route_transformers
from .logs import setup as setup_logging
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
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=50051)
    p.add_argument(
        "--model", default=None, help="local HF dir or hub id; default: embedded SmolLM2-135M-Instruct"
    )
    p.add_argument(
        "--engine",
        choices=("auto", "vllm", "hf"),
        default="auto",
        help="auto: vllm, unless the precision or an adapter method needs hf "
        "(int4 on CPU, or dora in --adapter-methods); int4 on CUDA: vllm runs the checkpoint's AWQ/GPTQ "
        "weights or bitsandbytes in-flight, hf runs bitsandbytes NF4",
    )
    p.add_argument(
        "--adapter-methods",
        default="lora,rslora",
        help="adapter methods this server must serve (comma list of lora, rslora, dora); "
        "dora is served by the hf engine only",
    )
    p.add_argument(
        "--precision",
        choices=("auto", *PRECISIONS),
        default="auto",
        help="auto: fp32 on CPU (fastest here), bf16 on CUDA",
    )
    p.add_argument(
        "--variant",
        action="append",
        default=[],
        metavar="PRECISION[:ENGINE]",
        help="host this variant of the model (repeatable; ENGINE defaults to --engine): each is its own "
        "engine with its own batch, and the router picks one per request by its objective; none: one "
        "variant from --precision and --engine",
    )
    p.add_argument(
        "--default-objective",
        choices=OBJECTIVES,
        default="latency",
        help="the objective of a request that names none (latency: what a server without variants gives)",
    )
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--max-concurrency", type=int, default=32, help="requests decoded together (batch slots)")
    p.add_argument(
        "--queue-size", type=int, default=256, help="requests waiting for a slot before RESOURCE_EXHAUSTED"
    )
    p.add_argument("--max-context", type=int, default=2048, help="prompt + new tokens")
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
    p.add_argument(
        "--kv-cache-gib",
        type=float,
        default=1.0,
        help="vLLM CPU KV cache size (GiB), reserved up front by each vLLM variant",
    )
    p.add_argument(
        "--tensor-parallel-size",
        type=int,
        default=1,
        help="vLLM: shard the model over this many GPUs of this host",
    )
    p.add_argument(
        "--vllm-compile",
        action="store_true",
        help="vLLM: compiled mode (torch.compile; inductor on CPU) instead of enforce_eager; start-up "
        "pays the compile. vLLM turns it off itself on CPU when adapters are enabled",
    )
    p.add_argument(
        "--compile-decode",
        action="store_true",
        help="hf engine: decode base and LoRA/rsLoRA rows on a static KV cache with one torch.compile'd "
        "step (batch buckets 1, 2, 4, ... up to --max-concurrency), compiled at start-up before SERVING; "
        "DoRA rows stay eager",
    )
    p.add_argument(
        "--stream-interval",
        type=int,
        default=1,
        help="vLLM: tokens a stream gathers per message after the first (fewer messages per token)",
    )
    p.add_argument(
        "--cpu-omp-bind",
        default=None,
        help="vLLM on CPU: OpenMP thread binding (VLLM_CPU_OMP_THREADS_BIND): nobind, auto (one pinned "
        "thread per core, one core kept for the scheduler and gRPC) or CPU lists like 0-3|4-7; "
        "default: the environment's, else nobind. Every vLLM variant's engine core binds the same CPUs",
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
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--log-level",
        default=None,
        help="show every library's records from this level on the console too (DEBUG, INFO, ...); "
        "default: effllm's own lines only, the rest in RUN_DIR/server.log",
    )
    p.add_argument("-v", "--verbose", action="count", default=0, help="-v: --log-level INFO; -vv: DEBUG")
    a = p.add_argument_group("adapters")
    a.add_argument("--adapter-root", type=Path, default=None, help="folder of NAME/VERSION/ PEFT adapters")
    a.add_argument("--max-adapters-per-batch", type=int, default=8, help="distinct adapters in one batch")
    a.add_argument(
        "--max-adapters-resident", type=int, default=16, help="loaded versions before LRU eviction"
    )
    a.add_argument("--max-adapter-rank", type=int, default=64)
    a.add_argument(
        "--adapter-unload-wait",
        type=float,
        default=30.0,
        help="seconds an unload waits for in-flight requests by default",
    )
    a.add_argument(
        "--preload",
        action="append",
        default=[],
        metavar="NAME[@VERSION]",
        help="adapter to load before serving (repeatable)",
    )
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
    add_telemetry_flags(p)
    p.set_defaults(func=run)


def resolve_device(device: str) -> str:
    if device != "auto":
        return device
    try:
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"
    except ImportError:
        return "cpu"


def choose_engine(engine: str, precision: str, device: str, adapter_methods: str) -> str:
    """`auto` -> vllm, unless hf is needed: int4 on CPU (vLLM's CPU backend has no int4) or DoRA."""
    if engine != "auto":
        return engine
    methods = {m.strip() for m in adapter_methods.split(",") if m.strip()}
    return "hf" if (precision == "int4" and device == "cpu") or "dora" in methods else "vllm"


def parse_variants(specs: list[str]) -> list[tuple[str, str]]:
    """["bf16", "int4:hf"] -> [("bf16", ""), ("int4", "hf")] (engine "" = --engine); ValueError names the
    bad one."""
    out: list[tuple[str, str]] = []
    for spec in specs:
        precision, _, engine = spec.strip().partition(":")
        if precision not in PRECISIONS:
            raise ValueError(f"--variant {spec!r}: precision is one of {', '.join(PRECISIONS)}")
        if engine not in ("", "auto", "vllm", "hf"):
            raise ValueError(f"--variant {spec!r}: engine is one of auto, vllm, hf")
        out.append((precision, "" if engine == "auto" else engine))
    return out


def build_engines(args: argparse.Namespace) -> list[Engine]:
    """One engine per --variant (none given: one from --precision and --engine); refuses duplicates."""
    specs = parse_variants(args.variant) if args.variant else [("", "")]
    engines = [build_engine(args, precision, engine) for precision, engine in specs]
    names = [f"{e.info.precision}:{e.info.engine}" for e in engines]
    if len(set(names)) != len(names):
        raise ValueError(f"--variant: {', '.join(names)} names a variant twice")
    return engines


def build_engine(args: argparse.Namespace, precision_arg: str = "", engine_arg: str = "") -> Engine:
    from ..common.model import resolve_model
    from .engines.vllm_engine import VllmConfig, VllmEngine

    device = resolve_device(args.device)
    wanted = precision_arg or args.precision
    precision = cast(Precision, wanted if wanted != "auto" else ("bf16" if device == "cuda" else "fp32"))
    model = resolve_model(args.model)
    if choose_engine(engine_arg or args.engine, precision, device, args.adapter_methods) == "hf":
        from .engines.hf_engine import HfConfig, HfEngine

        hf = HfConfig(
            precision=precision,
            max_context=args.max_context,
            max_concurrency=args.max_concurrency,
            device=device,
            seed=args.seed,
            compile_decode=getattr(args, "compile_decode", False),
        )
        # adapter limits come from the adapter flags where this server has them
        names = ("max_adapter_rank", "max_adapters_per_batch", "max_adapters_resident")
        limits = {k: getattr(args, k) for k in names if getattr(args, k, None)}
        return HfEngine(model, replace(hf, **limits))
    config = VllmConfig(
        precision=precision,
        max_context=args.max_context,
        max_concurrency=args.max_concurrency,
        kv_cache_gib=args.kv_cache_gib,
        device=device,
        seed=args.seed,
        tensor_parallel_size=args.tensor_parallel_size,
        enforce_eager=not args.vllm_compile,
        stream_interval=args.stream_interval,
        cpu_omp_bind=args.cpu_omp_bind,
        **_vllm_lora_options(args),
    )
    return VllmEngine(model, config)


def _vllm_lora_options(args: argparse.Namespace) -> dict[str, Any]:
    if args.adapter_root is None:
        return {}
    return dict(
        enable_lora=True,
        max_lora_rank=args.max_adapter_rank,
        max_loras=args.max_adapters_per_batch,
        max_cpu_loras=max(args.max_adapters_resident, args.max_adapters_per_batch),
    )


def build_registry(args: argparse.Namespace, engine: AdapterHost) -> AdapterRegistry:
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
        unload_wait_s=args.adapter_unload_wait,
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
            engines, config, defaults = assemble(args, auth, tls)
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
    return asyncio.run(serve(engines, config, build_registry(args, host), telemetry))


def assemble(
    args: argparse.Namespace, auth: AuthConfig, tls: TlsConfig | None
) -> tuple[list[Engine], ServerConfig, SamplingDefaults]:
    """The engines (not started) and the ServerConfig the flags describe: one server core, whether it runs
    alone or as a cluster replica (cluster/replica.py). Raises ValueError/OSError naming the bad flag."""
    engines = [maybe_inject(e) for e in build_engines(args)]
    model = getattr(engines[0], "model", None)  # ResolvedModel on both engines
    model_dir = model.path if model is not None else None
    defaults = load_sampling_defaults(model_dir)
    default_max_new = args.default_max_new_tokens or defaults.max_new_tokens or DEFAULT_MAX_NEW_TOKENS
    config = ServerConfig(
        host=args.host,
        port=args.port,
        max_concurrency=args.max_concurrency,
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
    )
    return engines, config, defaults
