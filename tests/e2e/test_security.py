"""Auth and TLS end to end against the real hardened server (mutual TLS, admin + generate tokens,
generation behind a token): who gets in, with which status, and the effllm CLI with the same flags."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import grpc
import pytest

from effllm.api.v1 import adapters_pb2, adapters_pb2_grpc
from effllm.client import ClientSecurity, EffllmClient

from .conftest import Hardened

PROMPT = "The capital of France is"


def _code(fn: object) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as info:
        fn()  # type: ignore[operator]
    return info.value.code()  # type: ignore[no-any-return]


def test_health_is_open_but_needs_tls(hardened: Hardened) -> None:
    with EffllmClient(hardened.server.target, security=hardened.security(None), timeout=10) as c:
        assert c.health() == "SERVING"


def test_generate_token_generates(hardened: Hardened) -> None:
    with EffllmClient(hardened.server.target, security=hardened.security("generate"), timeout=60) as c:
        reply = c.generate(PROMPT, max_new_tokens=4, temperature=0)
    assert reply.usage.output_tokens >= 1


def test_admin_token_also_generates(hardened: Hardened) -> None:
    with EffllmClient(hardened.server.target, security=hardened.security("admin"), timeout=60) as c:
        assert c.generate(PROMPT, max_new_tokens=2, temperature=0).usage.output_tokens >= 1


@pytest.mark.parametrize("token", [None, "x" * 32, "wrong-but-long-enough-token"])
def test_missing_or_bad_token_is_unauthenticated(hardened: Hardened, token: str | None) -> None:
    with EffllmClient(hardened.server.target, security=hardened.security(token), timeout=10) as c:
        assert _code(lambda: c.generate(PROMPT, max_new_tokens=2)) == grpc.StatusCode.UNAUTHENTICATED
        assert _code(lambda: list(c.stream(PROMPT, max_new_tokens=2))) == grpc.StatusCode.UNAUTHENTICATED
        assert _code(c.stats) == grpc.StatusCode.UNAUTHENTICATED


def test_wrong_scheme_is_unauthenticated(hardened: Hardened) -> None:
    with EffllmClient(hardened.server.target, security=hardened.security(None), timeout=10) as c:
        stub = c._gen
        from effllm.client import build_request

        md = (("authorization", f"Basic {hardened.generate_token}"),)
        with pytest.raises(grpc.RpcError) as info:
            stub.Generate(build_request(PROMPT, max_new_tokens=2), metadata=md, timeout=10)
    assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED


def test_admin_service_needs_admin_role(hardened: Hardened) -> None:
    def list_adapters(token: str | None) -> adapters_pb2.ListAdaptersResponse:
        with EffllmClient(hardened.server.target, security=hardened.security(token), timeout=10) as c:
            stub = adapters_pb2_grpc.AdapterServiceStub(c.channel)
            return stub.ListAdapters(adapters_pb2.ListAdaptersRequest(), timeout=10)

    list_adapters("admin")  # the admin role lists (an UNIMPLEMENTED AdapterService fails here)
    assert _code(lambda: list_adapters("generate")) == grpc.StatusCode.PERMISSION_DENIED
    assert _code(lambda: list_adapters(None)) == grpc.StatusCode.UNAUTHENTICATED


def _unreachable(security: ClientSecurity | None, target: str) -> grpc.StatusCode:
    with EffllmClient(target, security=security, timeout=5) as c:
        return _code(c.health)


def test_mtls_refuses_clients_without_a_trusted_cert(hardened: Hardened) -> None:
    target = hardened.server.target
    ca = hardened.pki.ca_cert.read_bytes()
    no_cert = ClientSecurity(root_cert=ca)
    rogue = ClientSecurity(
        root_cert=ca,
        client_cert=hardened.pki.rogue_client_cert.read_bytes(),
        client_key=hardened.pki.rogue_client_key.read_bytes(),
    )
    untrusted_server = ClientSecurity(
        root_cert=hardened.pki.rogue_client_cert.read_bytes(),
        client_cert=hardened.pki.client_cert.read_bytes(),
        client_key=hardened.pki.client_key.read_bytes(),
    )
    for security in (None, no_cert, rogue, untrusted_server):
        assert _unreachable(security, target) == grpc.StatusCode.UNAVAILABLE


def test_token_is_not_on_the_command_line(hardened: Hardened) -> None:
    cmdline = Path(f"/proc/{hardened.server.proc.pid}/cmdline").read_bytes()
    assert hardened.admin_token.encode() not in cmdline
    assert hardened.generate_token.encode() not in cmdline


def test_cli_generate_over_mtls_with_token_file(hardened: Hardened, tmp_path: Path) -> None:
    token_file = tmp_path / "token"
    token_file.write_text(hardened.generate_token + "\n")
    pki = hardened.pki
    base = [
        sys.executable,
        "-m",
        "effllm.cli.main",
        "generate",
        PROMPT,
        "--target",
        hardened.server.target,
        "--root-cert",
        str(pki.ca_cert),
        "--client-cert",
        str(pki.client_cert),
        "--client-key",
        str(pki.client_key),
        "--max-new-tokens",
        "3",
        "--temperature",
        "0",
    ]
    env = {k: v for k, v in os.environ.items() if k != "EFFLLM_AUTH_TOKEN"}
    ok = subprocess.run(
        [*base, "--token-file", str(token_file)], capture_output=True, text=True, env=env, timeout=60
    )
    assert ok.returncode == 0, ok.stderr
    assert "new tokens" in ok.stderr
    via_env = subprocess.run(
        base,
        capture_output=True,
        text=True,
        timeout=60,
        env={**env, "EFFLLM_AUTH_TOKEN": hardened.generate_token},
    )
    assert via_env.returncode == 0, via_env.stderr
    refused = subprocess.run(base, capture_output=True, text=True, env=env, timeout=60)
    assert refused.returncode == 1
    assert "UNAUTHENTICATED" in refused.stderr


def test_cli_adapters_takes_the_same_security_flags(hardened: Hardened, tmp_path: Path) -> None:
    """`effllm adapters` reaches a server with TLS and tokens as `effllm generate` does: the same flags,
    the same $EFFLLM_AUTH_TOKEN; a generate token is not enough for the admin service."""
    admin_file = tmp_path / "admin-token"
    admin_file.write_text(hardened.admin_token + "\n")
    pki = hardened.pki
    base = [
        *(sys.executable, "-m", "effllm.cli.main", "adapters", "--target", hardened.server.target),
        *("--root-cert", str(pki.ca_cert), "--client-cert", str(pki.client_cert)),
        *("--client-key", str(pki.client_key)),
    ]
    env = {k: v for k, v in os.environ.items() if k != "EFFLLM_AUTH_TOKEN"}

    def run(*extra: str, **more_env: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [*base, *extra], capture_output=True, text=True, timeout=60, env={**env, **more_env}
        )

    by_file = run("--token-file", str(admin_file), "--json", "list")
    assert by_file.returncode == 0, by_file.stderr
    assert isinstance(json.loads(by_file.stdout), list)
    via_env = run("list", EFFLLM_AUTH_TOKEN=hardened.admin_token)
    assert via_env.returncode == 0, via_env.stderr
    as_generate = run("list", EFFLLM_AUTH_TOKEN=hardened.generate_token)
    assert as_generate.returncode == 1 and "PERMISSION_DENIED" in as_generate.stderr
    refused = run("list")
    assert refused.returncode == 1 and "UNAUTHENTICATED" in refused.stderr
