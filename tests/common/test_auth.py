"""AuthConfig parsing and the interceptor's decisions, on a real in-process grpc.aio server whose
AdapterService answers ListAdapters (the role checks happen before any servicer code runs)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer

from effllm.api.v1 import adapters_pb2, adapters_pb2_grpc
from effllm.common.auth import AuthConfig, AuthInterceptor, bearer_token

ADMIN = "admin-token-0123456789abcdef"
GEN = "generate-token-0123456789abc"


def test_load_from_file_and_env(tmp_path: Path) -> None:
    f = tmp_path / "tokens"
    f.write_text(f"# comment\n{ADMIN}\ngenerate {GEN}  # trailing comment\n\n")
    config = AuthConfig.load(f, env={"EFFLLM_GENERATE_TOKEN": "env-generate-token-123456"})
    assert config.tokens == (("admin", ADMIN), ("generate", GEN), ("generate", "env-generate-token-123456"))
    assert config.role_of(ADMIN) == "admin" and config.role_of(GEN) == "generate"
    assert config.role_of(ADMIN[:-1]) is None and config.role_of("") is None


@pytest.mark.parametrize("line", ["root " + ADMIN, "admin short", f"admin {ADMIN} extra"])
def test_bad_token_files_are_refused(tmp_path: Path, line: str) -> None:
    f = tmp_path / "tokens"
    f.write_text(line + "\n")
    with pytest.raises(ValueError):
        AuthConfig.load(f, env={})


def test_policy() -> None:
    off = AuthConfig()
    assert not off.enabled and off.required_role("effllm.v1.AdapterService") is None
    with pytest.raises(ValueError, match="require_for_generate"):
        AuthConfig(require_for_generate=True)
    on = AuthConfig((("admin", ADMIN),))
    assert on.required_role("grpc.health.v1.Health") is None
    assert on.required_role("effllm.v1.GenerationService") is None
    assert on.required_role("effllm.v1.AdapterService") == "admin"
    assert on.required_role("effllm.v1.TuningService") == "admin"  # unknown services: admin by default
    strict = AuthConfig((("admin", ADMIN),), require_for_generate=True)
    assert strict.required_role("effllm.v1.GenerationService") == "generate"


def test_bearer_token_parsing() -> None:
    assert bearer_token([("authorization", "Bearer abc")]) == "abc"
    assert bearer_token([("authorization", "bearer  abc ")]) == "abc"
    assert bearer_token([("authorization", "Basic abc")]) == ""
    assert bearer_token([("x-other", "Bearer abc")]) is None


class _Adapters(adapters_pb2_grpc.AdapterServiceServicer):
    calls = 0

    async def ListAdapters(self, request: object, context: object) -> adapters_pb2.ListAdaptersResponse:
        _Adapters.calls += 1
        return adapters_pb2.ListAdaptersResponse()


@pytest.fixture
async def server() -> AsyncIterator[str]:
    config = AuthConfig((("admin", ADMIN), ("generate", GEN)))
    srv = grpc.aio.server(interceptors=[AuthInterceptor(config)])
    adapters_pb2_grpc.add_AdapterServiceServicer_to_server(_Adapters(), srv)
    health = HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health, srv)
    port = srv.add_insecure_port("127.0.0.1:0")
    await srv.start()
    yield f"127.0.0.1:{port}"
    await srv.stop(0)


@pytest.mark.parametrize(
    ("metadata", "expected"),
    [
        ((), grpc.StatusCode.UNAUTHENTICATED),
        ((("authorization", "Bearer nope-nope-nope-nope"),), grpc.StatusCode.UNAUTHENTICATED),
        ((("authorization", f"Bearer {GEN}"),), grpc.StatusCode.PERMISSION_DENIED),
        ((("authorization", f"Bearer {ADMIN}"),), grpc.StatusCode.OK),
    ],
)
async def test_interceptor_decisions(
    server: str, metadata: tuple[tuple[str, str], ...], expected: grpc.StatusCode
) -> None:
    before = _Adapters.calls
    async with grpc.aio.insecure_channel(server) as ch:
        stub = adapters_pb2_grpc.AdapterServiceStub(ch)
        try:
            await stub.ListAdapters(adapters_pb2.ListAdaptersRequest(), metadata=metadata, timeout=5)
            code = grpc.StatusCode.OK
        except grpc.RpcError as err:
            code = err.code()
            assert "ListAdapters" in (err.details() or "")
        # health stays open to everyone
        reply = await health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=5)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
    assert code == expected
    assert _Adapters.calls == before + (code == grpc.StatusCode.OK)  # refused calls never reach the servicer
