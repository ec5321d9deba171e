"""`effllm serve --replicas N`: start (or join) a Ray cluster, deploy the replicas, serve the front, drain.

Order, as the single server's: the front's port opens with health NOT_SERVING, the replicas load (each
loads the ledger's adapters before it takes traffic), health turns SERVING. On SIGTERM/SIGINT health turns
NOT_SERVING, new calls get UNAVAILABLE, calls in flight finish within --grace, then the Serve application
is deleted (Serve drains each replica) and, for a cluster this process started, every Ray process stops.
A local cluster is capped: --ray-cpus CPUs, 100 MB of object store, no dashboard, no HTTP proxy; Ray's
session files and its auth token live in a temporary folder removed on exit (its logs are copied into the
run dir first).
Invariant: this module is imported only when --replicas is given (server/cli.py), and it alone starts Ray.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import secrets
import shutil
import signal
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer
from grpc_reflection.v1alpha import reflection

from ...api.v1 import adapters_pb2_grpc as apb_grpc
from ...api.v1 import generation_pb2_grpc as pb_grpc
from ...common.auth import AuthConfig, AuthInterceptor, TlsConfig
from ...telemetry.tracing import TelemetryConfig
from ..app import SERVICE_NAMES
from .front import Cluster, FrontAdapters, FrontGeneration
from .replica import LEDGER, NAMESPACE, Ledger, Replica
from .routing import VIEW

log = logging.getLogger("effllm.server")
APP = "effllm"
DEPLOYMENT = "effllm-replica"
OBJECT_STORE_BYTES = 100 << 20  # Ray's floor is 75 MB; requests and replies are small protobufs
ROUTER = "effllm.server.cluster.routing.EffllmRouter"


def run_cluster(
    args: argparse.Namespace,
    replicas: tuple[int, int],
    auth: AuthConfig,
    tls: TlsConfig | None,
    telemetry: TelemetryConfig,
) -> int:
    import ray

    tmp = Path(tempfile.mkdtemp(prefix="effllm-ray-"))  # short: Ray's socket paths must fit 107 bytes
    local = not args.ray_address
    try:
        if local:
            # Ray 2.60 turns token auth on and would write ~/.ray/auth_token: this cluster's lives and dies
            # with its session folder instead
            token = tmp / "auth_token"
            token.touch(mode=0o600)
            token.write_text(secrets.token_hex(32))
            os.environ["RAY_AUTH_TOKEN_PATH"] = str(token)
            ray.init(
                num_cpus=args.ray_cpus or os.cpu_count() or 1,
                object_store_memory=OBJECT_STORE_BYTES,
                include_dashboard=False,
                _temp_dir=str(tmp),
                namespace=NAMESPACE,
                logging_level=logging.WARNING,
                log_to_driver=args.verbose > 0,
            )
        else:
            ray.init(address=args.ray_address, namespace=NAMESPACE, logging_level=logging.WARNING)
        log.info(
            "ray cluster %s: %s", "started" if local else "joined", ray.get_runtime_context().gcs_address
        )
        return asyncio.run(_serve(args, replicas, auth, tls, telemetry))
    finally:
        _stop_ray(local, tmp, telemetry.run_dir, delete_app=not args.attach)


def _stop_ray(local: bool, tmp: Path, run_dir: Path | None, delete_app: bool = True) -> None:
    """Delete the application (Serve drains each replica), then stop a cluster this process started. Each
    step is bounded: a cluster whose raylet is already gone must not hang the exit."""
    import ray
    from ray import serve

    def bounded(step: Callable[[], object], seconds: float) -> None:
        def guarded() -> None:
            try:
                step()
            except Exception as err:
                log.warning("stopping the cluster: %s", err)

        worker = threading.Thread(target=guarded, daemon=True)
        worker.start()
        worker.join(seconds)

    if ray.is_initialized() and delete_app:  # an attached front leaves the RayService's application alone
        bounded(lambda: serve.delete(APP), 60.0)
        if local:
            bounded(serve.shutdown, 30.0)
    with contextlib.suppress(Exception):
        ray.shutdown()  # a cluster this process started: raylet, GCS and every worker stop with it
    if local and run_dir is not None:
        logs = tmp / "session_latest" / "logs"
        with contextlib.suppress(OSError):
            shutil.copytree(logs, Path(run_dir) / "ray-logs", dirs_exist_ok=True)
    shutil.rmtree(tmp, ignore_errors=True)
    log.info("ray stopped" if local else "left the ray cluster")


def deployment_options(args: argparse.Namespace, replicas: tuple[int, int]) -> dict[str, Any]:
    from ray.serve.config import RequestRouterConfig

    low, high = replicas
    # the routing stats every half second: the router's load figure between them is its own count of calls
    router: dict[str, Any] = dict(
        request_router_class=ROUTER, request_routing_stats_period_s=0.5, request_routing_stats_timeout_s=5.0
    )
    options: dict[str, Any] = dict(
        name=DEPLOYMENT,
        ray_actor_options={"num_cpus": args.replica_cpus, "num_gpus": args.replica_gpus},
        # Serve's own cap per replica: the slots and the queue, and a few admin and stats calls besides
        max_ongoing_requests=args.max_concurrency + args.queue_size + 8,
        request_router_config=RequestRouterConfig(**router),
        health_check_period_s=2.0,
        health_check_timeout_s=60.0,
        graceful_shutdown_timeout_s=max(args.grace, 1.0),
        graceful_shutdown_wait_loop_s=0.5,
    )
    if low == high:
        options["num_replicas"] = low
    else:  # scale on ongoing requests per replica: a replica whose slots are all taken asks for another
        options["autoscaling_config"] = {
            "min_replicas": low,
            "max_replicas": high,
            "target_ongoing_requests": args.max_concurrency,
            "upscale_delay_s": 5.0,
            "downscale_delay_s": 60.0,
        }
    return options


def replica_app(
    args: argparse.Namespace, replicas: tuple[int, int], auth: AuthConfig, telemetry: TelemetryConfig | None
) -> Any:
    """The Serve application of the replicas, from `effllm serve`'s flags."""
    from ray import serve

    flags = {k: v for k, v in vars(args).items() if k != "func"}
    return serve.deployment(**deployment_options(args, replicas))(Replica).bind(flags, telemetry, auth)


def build_app(config: dict[str, Any]) -> Any:
    """Serve's declarative entry point (serveConfigV2 `import_path: effllm.server.cluster.launch:build_app`,
    as a RayService on KubeRay deploys it): `args: {flags: [...]}` are `effllm serve`'s flags, --replicas
    among them. The front then runs with `--ray-address ADDR --attach`. Replicas run without telemetry
    here."""
    from ...common.auth import security_config
    from ..cli import add_parser
    from .placement import parse_replicas

    parser = argparse.ArgumentParser(prog="effllm")
    add_parser(parser.add_subparsers())
    args = parser.parse_args(["serve", *map(str, config.get("flags", []))])
    auth, _ = security_config(args)
    return replica_app(args, parse_replicas(args.replicas or "1"), auth, None)


async def _serve(
    args: argparse.Namespace,
    replicas: tuple[int, int],
    auth: AuthConfig,
    tls: TlsConfig | None,
    telemetry: TelemetryConfig,
) -> int:
    import ray
    from ray import serve

    serve.start(proxy_location="Disabled")
    # Joined to a lasting cluster (KubeRay), the record must outlive this front: a restarted front finds it.
    lifetime = "detached" if args.ray_address else None
    ledger = (
        ray.remote(num_cpus=0)(Ledger)
        .options(name=LEDGER, namespace=NAMESPACE, get_if_exists=True, lifetime=lifetime)
        .remote()
    )
    tele = (
        replace(telemetry, run_dir=Path(telemetry.run_dir or ".") / "replicas") if telemetry.enabled else None
    )
    app = replica_app(args, replicas, auth, tele)

    health = HealthServicer()
    cluster = Cluster(handle=None)
    opts = [
        ("grpc.max_receive_message_length", int(args.max_message_mib * (1 << 20))),
        ("grpc.max_send_message_length", int(args.max_message_mib * (1 << 20))),
    ]
    server = grpc.aio.server(options=opts, interceptors=[AuthInterceptor(auth)] if auth.enabled else [])
    pb_grpc.add_GenerationServiceServicer_to_server(FrontGeneration(cluster), server)
    apb_grpc.add_AdapterServiceServicer_to_server(FrontAdapters(cluster, ledger), server)
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    names = (
        *SERVICE_NAMES,
        health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
        reflection.SERVICE_NAME,
    )
    reflection.enable_server_reflection(names, server)
    address = f"{args.host}:{args.port}"
    port = server.add_secure_port(address, tls.credentials()) if tls else server.add_insecure_port(address)
    if port == 0:
        raise RuntimeError(f"could not bind {address}")

    async def set_health(status: int) -> None:
        for name in ("", *SERVICE_NAMES):
            await health.set(name, status)

    await set_health(health_pb2.HealthCheckResponse.NOT_SERVING)
    await server.start()
    log.info("front listening on %s:%d; deploying %s replicas", args.host, port, args.replicas)

    loop = asyncio.get_running_loop()
    stopped = asyncio.Event()
    tasks: set[asyncio.Task[None]] = set()
    signals = 0

    async def drain() -> None:
        cluster.draining = True
        await set_health(health_pb2.HealthCheckResponse.NOT_SERVING)
        deadline = loop.time() + args.grace
        log.info("draining: %d calls in flight, grace %.1fs", cluster.in_flight, args.grace)
        while cluster.in_flight > 0 and loop.time() < deadline:
            await asyncio.sleep(0.05)
        await server.stop(grace=0.5)
        stopped.set()

    def on_signal() -> None:
        nonlocal signals
        signals += 1
        if signals == 1:
            tasks.add(loop.create_task(drain()))
        else:
            log.warning("second signal: stopping now")
            stopped.set()

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal)
    try:
        started = time.monotonic()
        deploy: asyncio.Future[Any] = loop.run_in_executor(
            None,
            (lambda: serve.status()) if args.attach else lambda: serve.run(app, name=APP, route_prefix=None),
        )
        waiter: asyncio.Future[Any] = loop.create_task(stopped.wait())
        await asyncio.wait([deploy, waiter], return_when=asyncio.FIRST_COMPLETED)
        waiter.cancel()
        if stopped.is_set():
            return 0
        deploy.result()
        cluster.handle = serve.get_deployment_handle(DEPLOYMENT, app_name=APP)
        # one call through the handle starts its router, which then learns the replicas (VIEW)
        await cluster.handle.options(method_name="record_routing_stats").remote()
        # ready once the router has each replica's routing stats (its slots and adapters): the front's
        # placement reads them (placement.state_of)
        while sum(1 for stats in VIEW.stats().values() if stats) < replicas[0] and not stopped.is_set():
            await asyncio.sleep(0.1)
        cluster.ready = True
        await set_health(health_pb2.HealthCheckResponse.SERVING)
        log.info(
            "ready: %d replicas in %.1fs on %s:%d",
            len(VIEW.ids()),
            time.monotonic() - started,
            args.host,
            port,
        )
        await stopped.wait()
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)
        await server.stop(grace=0)
    log.info("stopped")
    return 0
