"""Who may call what: bearer tokens with two roles, checked by a grpc.aio server interceptor, and TLS.

Both servers use it (`effllm serve` and `effllm tuner serve`): the same flags (`add_flags`), the same
checks of an unsafe combination (`security_config`), the same interceptor.

Invariant: every RPC outside the public set (health, reflection, and GenerationService unless
`require_for_generate`) needs the `admin` role — an unknown service is admin-only by default, so a service
added later (AdapterService, TuningService, ...) is protected without touching this module. Tokens are
compared in constant time against every configured token, and never come from a command-line value
(they would show in `ps`): from a file or from the environment. A public RPC that answers each role
differently (GetTelemetry: per-request figures for admin only) asks `caller_role`.
"""

from __future__ import annotations

import argparse
import hmac
import logging
import os
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

log = logging.getLogger("effllm.common.auth")

ROLES = ("admin", "generate")
# Always open: orchestrators probe health without credentials; reflection only describes the public API.
PUBLIC_SERVICES = frozenset(
    {
        "grpc.health.v1.Health",
        "grpc.reflection.v1alpha.ServerReflection",
        "grpc.reflection.v1.ServerReflection",
    }
)
GENERATION_SERVICE = "effllm.v1.GenerationService"
ENV_ADMIN = "EFFLLM_AUTH_TOKEN"
ENV_GENERATE = "EFFLLM_GENERATE_TOKEN"
MIN_TOKEN_CHARS = 16


@dataclass(frozen=True)
class AuthConfig:
    """(role, token) pairs; no pairs means auth is off (the CLI refuses that off loopback)."""

    tokens: tuple[tuple[str, str], ...] = ()
    require_for_generate: bool = False

    def __post_init__(self) -> None:
        for role, token in self.tokens:
            if role not in ROLES:
                raise ValueError(f"auth token role {role!r} is not one of {', '.join(ROLES)}")
            if len(token) < MIN_TOKEN_CHARS or any(c.isspace() for c in token) or not token.isprintable():
                raise ValueError(
                    f"a {role} token must be >= {MIN_TOKEN_CHARS} printable characters, no spaces"
                )
        if self.require_for_generate and not self.tokens:
            raise ValueError("require_for_generate needs at least one token (--auth-token-file or env)")

    @property
    def enabled(self) -> bool:
        return bool(self.tokens)

    @classmethod
    def load(
        cls,
        token_file: Path | None = None,
        *,
        require_for_generate: bool = False,
        env: Mapping[str, str] | None = None,
    ) -> AuthConfig:
        """Tokens from `token_file` (lines `admin TOKEN`, `generate TOKEN`, or a bare `TOKEN` = admin;
        `#` comments) and from $EFFLLM_AUTH_TOKEN (admin) / $EFFLLM_GENERATE_TOKEN (generate)."""
        env = os.environ if env is None else env
        tokens: list[tuple[str, str]] = []
        if token_file is not None:
            for n, raw in enumerate(token_file.read_text().splitlines(), 1):
                line = raw.split("#", 1)[0].strip()
                if not line:
                    continue
                parts = line.split()
                if len(parts) == 1:
                    tokens.append(("admin", parts[0]))
                elif len(parts) == 2 and parts[0] in ROLES:
                    tokens.append((parts[0], parts[1]))
                else:
                    raise ValueError(
                        f"{token_file}:{n}: expected `TOKEN` or `ROLE TOKEN` (ROLE: admin|generate)"
                    )
        for var, role in ((ENV_ADMIN, "admin"), (ENV_GENERATE, "generate")):
            if env.get(var):
                tokens.append((role, env[var].strip()))
        return cls(tuple(tokens), require_for_generate)

    def role_of(self, token: str) -> str | None:
        """The role `token` carries, or None. Looks at every token (no early exit) in constant time."""
        given = token.encode()
        found: str | None = None
        for role, expected in self.tokens:
            if hmac.compare_digest(given, expected.encode()) and found is None:
                found = role
        return found

    def required_role(self, service: str) -> str | None:
        if not self.enabled or service in PUBLIC_SERVICES:
            return None
        if service == GENERATION_SERVICE:
            return "generate" if self.require_for_generate else None
        return "admin"


def caller_role(config: AuthConfig, metadata: Any) -> str | None:
    """The role of an RPC's caller, for a method that answers each role differently: `admin` when auth is
    off (anyone may call the admin RPCs then), else its bearer token's role; None without a valid token."""
    if not config.enabled:
        return "admin"
    token = bearer_token(metadata)
    return config.role_of(token) if token else None


def bearer_token(metadata: Any) -> str | None:
    for key, value in metadata or ():
        if key == "authorization":
            text = value.decode() if isinstance(value, bytes) else str(value)
            scheme, _, token = text.strip().partition(" ")
            return token.strip() if scheme.lower() == "bearer" and token.strip() else ""
    return None


class AuthInterceptor(grpc.aio.ServerInterceptor):
    """Refuses before the method runs: UNAUTHENTICATED (no/unknown token), PERMISSION_DENIED (wrong role)."""

    def __init__(self, config: AuthConfig) -> None:
        self.config = config

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        method: str = details.method  # type: ignore[attr-defined]
        service = method.lstrip("/").split("/", 1)[0]
        needed = self.config.required_role(service)
        handler = await continuation(details)
        if needed is None or handler is None:
            return handler
        token = bearer_token(details.invocation_metadata)  # type: ignore[attr-defined]
        if token is None:
            return _refusal(
                handler,
                grpc.StatusCode.UNAUTHENTICATED,
                f"{method} needs `authorization: Bearer TOKEN` metadata ({needed} role)",
            )
        role = self.config.role_of(token)
        if role is None:
            return _refusal(
                handler, grpc.StatusCode.UNAUTHENTICATED, f"{method}: the bearer token is not valid"
            )
        if needed == "admin" and role != "admin":
            return _refusal(
                handler,
                grpc.StatusCode.PERMISSION_DENIED,
                f"{method} needs the admin role; this token has the {role} role",
            )
        return handler


def _refusal(handler: grpc.RpcMethodHandler, code: grpc.StatusCode, message: str) -> grpc.RpcMethodHandler:
    """A handler of the same shape as `handler` that only aborts (the request is never passed on)."""
    log.info("refused: %s: %s", code.name, message)

    async def unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
        await context.abort(code, message)

    async def streaming(request: Any, context: grpc.aio.ServicerContext) -> Any:
        await context.abort(code, message)
        yield  # pragma: no cover - makes this an async generator

    kw = dict(
        request_deserializer=handler.request_deserializer, response_serializer=handler.response_serializer
    )
    if handler.request_streaming and handler.response_streaming:
        return grpc.stream_stream_rpc_method_handler(streaming, **kw)
    if handler.request_streaming:
        return grpc.stream_unary_rpc_method_handler(unary, **kw)
    if handler.response_streaming:
        return grpc.unary_stream_rpc_method_handler(streaming, **kw)
    return grpc.unary_unary_rpc_method_handler(unary, **kw)


@dataclass(frozen=True)
class TlsConfig:
    """PEM files for the server; `client_ca` set means mutual TLS (clients must present a cert it signed)."""

    cert: Path
    key: Path
    client_ca: Path | None = None

    def __post_init__(self) -> None:
        for path in (self.cert, self.key, self.client_ca):
            if path is not None and not path.is_file():
                raise ValueError(f"TLS file {path} does not exist")

    def credentials(self) -> grpc.ServerCredentials:
        ca = self.client_ca.read_bytes() if self.client_ca else None
        return grpc.ssl_server_credentials(
            [(self.key.read_bytes(), self.cert.read_bytes())],
            root_certificates=ca,
            require_client_auth=ca is not None,
        )


def is_loopback(host: str) -> bool:
    return host in ("localhost", "::1") or host.startswith("127.")


def add_flags(p: argparse.ArgumentParser, *, generate_role: bool = True) -> None:
    """--auth-token-file, --allow-unauthenticated-admin and the TLS flags; `generate_role`: the server has a
    GenerationService, so --require-auth-for-generate too."""
    sec = p.add_argument_group("security (see docs/security.md)")
    sec.add_argument(
        "--auth-token-file",
        type=Path,
        default=None,
        help=f"lines `admin TOKEN` / `generate TOKEN` (or ${ENV_ADMIN} / ${ENV_GENERATE}); "
        "with a token, every service but health and generation needs the admin role",
    )
    if generate_role:
        sec.add_argument(
            "--require-auth-for-generate",
            action="store_true",
            help="GenerationService needs a token too (generate or admin role)",
        )
    sec.add_argument(
        "--allow-unauthenticated-admin",
        action="store_true",
        help="serve admin RPCs without a token on a non-loopback host (not recommended)",
    )
    sec.add_argument("--tls-cert", type=Path, default=None, help="server certificate chain (PEM)")
    sec.add_argument("--tls-key", type=Path, default=None, help="server private key (PEM)")
    sec.add_argument(
        "--tls-client-ca",
        type=Path,
        default=None,
        help="CA bundle (PEM) that signs client certificates: mutual TLS",
    )


def security_config(args: argparse.Namespace) -> tuple[AuthConfig, TlsConfig | None]:
    """Raises ValueError with a message for the user on an unsafe or incomplete combination."""
    auth = AuthConfig.load(
        args.auth_token_file, require_for_generate=getattr(args, "require_auth_for_generate", False)
    )
    if not auth.enabled and not is_loopback(args.host) and not args.allow_unauthenticated_admin:
        raise ValueError(
            f"--host {args.host} is not loopback and no admin token is set: give --auth-token-file or "
            f"${ENV_ADMIN} (or --allow-unauthenticated-admin to accept that anyone may call admin RPCs)"
        )
    if (args.tls_cert is None) != (args.tls_key is None):
        raise ValueError("--tls-cert and --tls-key go together")
    if args.tls_client_ca is not None and args.tls_cert is None:
        raise ValueError("--tls-client-ca (mutual TLS) needs --tls-cert and --tls-key")
    tls = TlsConfig(args.tls_cert, args.tls_key, args.tls_client_ca) if args.tls_cert else None
    return auth, tls
