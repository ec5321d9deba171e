"""Channels to one server or to several replicas: TLS / mutual TLS, a bearer token, round_robin + health.

One target gives a plain channel. Several targets (a list, or one comma-separated string) give ONE channel
over all of them with gRPC's own `round_robin` policy, client-side health checking (a replica that reports
NOT_SERVING — loading or draining — gets no new calls) and a retry policy for UNAVAILABLE. gRPC commits a
call once the server has sent anything back, so a retry only ever happens for a request that produced
nothing yet (never reached a replica, refused by one that drains, or lost with a replica before its first
token): a generation that already streamed tokens is never replayed.
"""

from __future__ import annotations

import ipaddress
import json
import os
import socket
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

MAX_MESSAGE_BYTES = 16 << 20
ENV_TOKEN = "EFFLLM_AUTH_TOKEN"
# Only generation is retried: admin calls (adapters, tuning) go to each replica on its own, by address.
RETRIED_SERVICES = ("effllm.v1.GenerationService",)

Targets = str | Sequence[str]


@dataclass(frozen=True)
class ClientSecurity:
    """How to reach a protected server. `tls` with no `root_cert` trusts the system roots."""

    tls: bool = False
    root_cert: bytes | None = None  # PEM of the CA that signed the server certificate
    client_cert: bytes | None = None  # PEM chain; with client_key: mutual TLS
    client_key: bytes | None = None
    token: str | None = None  # sent as `authorization: Bearer TOKEN`
    server_name: str | None = None  # expected name in the server certificate, when it differs from the target

    def __post_init__(self) -> None:
        if (self.client_cert is None) != (self.client_key is None):
            raise ValueError("client_cert and client_key go together")
        if (self.root_cert or self.client_cert) and not self.tls:
            object.__setattr__(self, "tls", True)
        if self.token is not None and (not self.token or any(c.isspace() for c in self.token)):
            raise ValueError("token must be non-empty with no whitespace")

    @classmethod
    def from_files(
        cls,
        *,
        root_cert: Path | None = None,
        client_cert: Path | None = None,
        client_key: Path | None = None,
        token_file: Path | None = None,
        tls: bool = False,
        server_name: str | None = None,
        env_token: bool = True,
    ) -> ClientSecurity:
        """Read PEM files and the token (a file's first non-comment word, else $EFFLLM_AUTH_TOKEN)."""
        token = None
        if token_file is not None:
            words = [ln.split("#", 1)[0].split() for ln in token_file.read_text().splitlines()]
            token = next((w[-1] for w in words if w), None)
        elif env_token and os.environ.get(ENV_TOKEN):
            token = os.environ[ENV_TOKEN].strip()
        return cls(
            tls=tls,
            root_cert=root_cert.read_bytes() if root_cert else None,
            client_cert=client_cert.read_bytes() if client_cert else None,
            client_key=client_key.read_bytes() if client_key else None,
            token=token,
            server_name=server_name,
        )

    def channel_credentials(self) -> grpc.ChannelCredentials:
        return grpc.ssl_channel_credentials(self.root_cert, self.client_key, self.client_cert)

    @property
    def metadata(self) -> tuple[tuple[str, str], ...]:
        return (("authorization", f"Bearer {self.token}"),) if self.token else ()


def split_targets(targets: Targets) -> list[str]:
    items = [targets] if isinstance(targets, str) else list(targets)
    out = [t.strip() for item in items for t in item.split(",") if t.strip()]
    if not out:
        raise ValueError("no target given")
    return out


def balanced_target(targets: Sequence[str]) -> str:
    """`host:port` list -> one static-resolver URI (`ipv4:a:p,b:q` or `ipv6:[a]:p,...`); names are
    resolved once, here. One target is returned as is (any gRPC target URI works there)."""
    if len(targets) == 1:
        return targets[0]
    v4: list[str] = []
    v6: list[str] = []
    for target in targets:
        host, sep, port = target.rpartition(":")
        if not sep or not port.isdigit():
            raise ValueError(f"target {target!r}: a replica list needs host:port entries")
        host = host.strip("[]")
        try:
            addresses = [ipaddress.ip_address(host)]
        except ValueError:
            infos = socket.getaddrinfo(host, int(port), type=socket.SOCK_STREAM)
            addresses = [ipaddress.ip_address(info[4][0]) for info in infos]
        for addr in dict.fromkeys(addresses):
            (v4 if addr.version == 4 else v6).append(
                f"{addr}:{port}" if addr.version == 4 else f"[{addr}]:{port}"
            )
    if v4 and v6:
        raise ValueError("a replica list must be all IPv4 or all IPv6 addresses")
    return f"ipv4:{','.join(v4)}" if v4 else f"ipv6:{','.join(v6)}"


def service_config(replicas: int) -> str | None:
    """None for one server: its channel behaves exactly like a plain one (no retries, no health gating —
    which would also block the health and stats calls a client makes while that server loads or drains)."""
    if replicas < 2:
        return None
    config: dict[str, Any] = {
        "loadBalancingConfig": [{"round_robin": {}}],
        "healthCheckConfig": {"serviceName": ""},
        "methodConfig": [
            {
                "name": [{"service": s} for s in RETRIED_SERVICES],
                "retryPolicy": {
                    "maxAttempts": max(2, min(replicas + 1, 5)),
                    "initialBackoff": "0.05s",
                    "maxBackoff": "1s",
                    "backoffMultiplier": 2,
                    "retryableStatusCodes": ["UNAVAILABLE"],
                },
            }
        ],
    }
    return json.dumps(config)


def channel_options(
    replicas: int, security: ClientSecurity | None, max_message_bytes: int = MAX_MESSAGE_BYTES
) -> list[tuple[str, Any]]:
    opts: list[tuple[str, Any]] = [
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.max_send_message_length", max_message_bytes),
    ]
    config = service_config(replicas)
    if config is not None:
        opts += [("grpc.enable_retries", 1), ("grpc.service_config", config)]
    if security is not None and security.server_name:
        opts.append(("grpc.ssl_target_name_override", security.server_name))
    return opts


def make_channel(
    targets: Targets, security: ClientSecurity | None = None, *, max_message_bytes: int = MAX_MESSAGE_BYTES
) -> tuple[grpc.Channel, grpc.Channel]:
    """(channel to call through, the raw channel underneath for connectivity checks)."""
    hosts = split_targets(targets)
    target = balanced_target(hosts)
    opts = channel_options(len(hosts), security, max_message_bytes)
    if security is not None and security.tls:
        raw = grpc.secure_channel(target, security.channel_credentials(), options=opts)
    else:
        raw = grpc.insecure_channel(target, options=opts)
    if security is None or not security.metadata:
        return raw, raw
    return grpc.intercept_channel(raw, _SyncToken(security.metadata)), raw


def make_aio_channel(
    targets: Targets, security: ClientSecurity | None = None, *, max_message_bytes: int = MAX_MESSAGE_BYTES
) -> grpc.aio.Channel:
    hosts = split_targets(targets)
    target = balanced_target(hosts)
    opts = channel_options(len(hosts), security, max_message_bytes)
    interceptors = _aio_token(security.metadata) if security is not None and security.metadata else None
    if security is not None and security.tls:
        return grpc.aio.secure_channel(
            target, security.channel_credentials(), options=opts, interceptors=interceptors
        )
    return grpc.aio.insecure_channel(target, options=opts, interceptors=interceptors)


def _with_metadata(details: Any, extra: tuple[tuple[str, str], ...]) -> Any:
    """The call details with `extra` metadata added (ClientCallDetails are namedtuple-like)."""
    metadata = [*(details.metadata or ()), *extra]
    return (
        details._replace(metadata=metadata) if hasattr(details, "_replace") else _Details(details, metadata)
    )


class _Details(grpc.ClientCallDetails):
    def __init__(self, base: Any, metadata: list[tuple[str, str]]) -> None:
        self.method = base.method
        self.timeout = base.timeout
        self.metadata = metadata
        self.credentials = base.credentials
        self.wait_for_ready = getattr(base, "wait_for_ready", None)
        self.compression = getattr(base, "compression", None)


class _SyncToken(grpc.UnaryUnaryClientInterceptor, grpc.UnaryStreamClientInterceptor):  # type: ignore[misc]
    # NOTE: an interceptor rather than call credentials: gRPC refuses call credentials on plaintext
    # channels, and the token must also work on loopback without TLS.
    def __init__(self, metadata: tuple[tuple[str, str], ...]) -> None:
        self.extra = metadata

    def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
        return continuation(_with_metadata(details, self.extra), request)

    def intercept_unary_stream(self, continuation: Any, details: Any, request: Any) -> Any:
        return continuation(_with_metadata(details, self.extra), request)


def _aio_token(metadata: tuple[tuple[str, str], ...]) -> list[grpc.aio.ClientInterceptor]:
    class UnaryUnary(grpc.aio.UnaryUnaryClientInterceptor):
        async def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
            return await continuation(_aio_details(details, metadata), request)

    class UnaryStream(grpc.aio.UnaryStreamClientInterceptor):
        async def intercept_unary_stream(self, continuation: Any, details: Any, request: Any) -> Any:
            return await continuation(_aio_details(details, metadata), request)

    return [UnaryUnary(), UnaryStream()]


def _aio_details(details: grpc.aio.ClientCallDetails, extra: tuple[tuple[str, str], ...]) -> Any:
    metadata = grpc.aio.Metadata(*(details.metadata or ()), *extra)
    return grpc.aio.ClientCallDetails(
        details.method, details.timeout, metadata, details.credentials, details.wait_for_ready
    )
