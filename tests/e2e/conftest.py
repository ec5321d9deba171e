"""A hardened server for the reliability tests: mutual TLS, admin + generate tokens, generation behind a
token, tight limits, a small batch and queue, an adapter root holding good/1, and failpoints (requests
named `fault-*` raise mid-stream,
`slow-*` ones stall for an hour)."""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from effllm.api.v1 import generation_pb2 as pb
from effllm.client import ClientSecurity, EffllmClient

from ..adapterroot import AdapterRoot
from ..certs import Pki, make_pki
from ..serverproc import ServerProcess, start_server

HARDENED_LIMITS = {
    "max_concurrency": 2,
    "queue_size": 2,
    "max_prompt_tokens": 64,
    "max_request_s": 30.0,
    "max_message_mib": 1.0,
    "max_new_tokens": 256,
}


@dataclass(frozen=True)
class Hardened:
    server: ServerProcess
    pki: Pki
    admin_token: str
    generate_token: str
    adapter_root: Path | None = None  # ROOT with good/1 (a real LoRA) when the server serves adapters

    def security(self, token: str | None = "generate", *, client_cert: bool = True) -> ClientSecurity:
        """Client settings: `token` is a role name ("generate"/"admin"), a literal token, or None."""
        value = {"generate": self.generate_token, "admin": self.admin_token}.get(token or "", token)
        return ClientSecurity(
            root_cert=self.pki.ca_cert.read_bytes(),
            client_cert=self.pki.client_cert.read_bytes() if client_cert else None,
            client_key=self.pki.client_key.read_bytes() if client_cert else None,
            token=value,
        )


def _make_good_adapter(folder: Path) -> None:
    from effllm.common.model import resolve_model

    from ..adaptertools import make_adapter

    make_adapter(resolve_model(None).path, folder, method="lora", rank=8, seed=11)


@pytest.fixture(scope="session")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="session")
def hardened(pki: Pki, logs_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Hardened]:
    admin, generate = secrets.token_urlsafe(24), secrets.token_urlsafe(24)
    token_file = tmp_path_factory.mktemp("auth") / "tokens"
    token_file.write_text(f"# role token\nadmin {admin}\ngenerate {generate}\n")
    token_file.chmod(0o600)
    adapter_root = tmp_path_factory.mktemp("adapter-root")
    _make_good_adapter(adapter_root / "good" / "1")
    lim = HARDENED_LIMITS
    security = ClientSecurity(
        root_cert=pki.ca_cert.read_bytes(),
        client_cert=pki.client_cert.read_bytes(),
        client_key=pki.client_key.read_bytes(),
        token=generate,
    )
    server = start_server(
        "--engine",
        "vllm",
        "--precision",  # pinned: `auto` is bf16 on a CPU with native bf16, and these tests compare fp32
        "fp32",
        "--kv-cache-gib",
        "0.25",
        "--max-context",
        "512",
        "--max-concurrency",
        str(lim["max_concurrency"]),
        "--queue-size",
        str(lim["queue_size"]),
        "--max-prompt-tokens",
        str(lim["max_prompt_tokens"]),
        "--max-request-seconds",
        str(lim["max_request_s"]),
        "--max-message-mib",
        str(lim["max_message_mib"]),
        "--max-new-tokens",
        str(lim["max_new_tokens"]),
        "--default-max-new-tokens",
        "16",
        "--auth-token-file",
        str(token_file),
        "--require-auth-for-generate",
        "--tls-cert",
        str(pki.server_cert),
        "--tls-key",
        str(pki.server_key),
        "--tls-client-ca",
        str(pki.ca_cert),
        "--adapter-root",
        str(adapter_root),
        log_dir=logs_dir,
        env={
            "EFFLLM_FAILPOINTS": "engine_raise_prefix=fault-,engine_raise_after=2,"
            "engine_delay_prefix=slow-,engine_delay_s=3600",
            "EFFLLM_AUTH_TOKEN": "",
            "EFFLLM_GENERATE_TOKEN": "",
        },
        security=security,
        ready_timeout=900,  # start-up takes minutes on a shared, oversubscribed box
    )
    yield Hardened(server, pki, admin, generate, adapter_root)
    server.stop()


# --- adapters: one vLLM server on the session's adapter root, for test_adapters_e2e and test_tune_publish ---
@pytest.fixture(scope="session")
def adapter_server(adapter_root: AdapterRoot, logs_dir: Path) -> Iterator[ServerProcess]:
    """vLLM on tests/adapterroot.py's root: resident limit 4, 4 adapters per batch, max rank 16, 32 batch
    slots, demo@1 preloaded. Shared so that tune -> publish -> serve needs no server of its own (a vLLM
    start-up is half a minute on 2 cores); each user leaves only demo@1 loaded."""
    server = start_server(
        "--engine",
        "vllm",
        "--precision",  # pinned: `auto` is bf16 on a CPU with native bf16, and these tests compare fp32
        "fp32",
        "--adapter-root",
        str(adapter_root.root),
        "--max-adapter-rank",
        "16",
        "--max-adapters-resident",
        "4",
        "--max-adapters-per-batch",
        "4",
        "--max-concurrency",
        "32",
        "--queue-size",
        "64",
        "--max-context",
        "512",
        "--kv-cache-gib",
        "0.25",
        "--preload",
        "demo@1",
        log_dir=logs_dir,
        ready_timeout=900,
    )
    yield server
    server.stop()


# --- many adapters (issue 12): 64 distinct adapters, one server per engine for the session --------------
MANY_ADAPTERS = 64


@dataclass(frozen=True)
class ManyAdapters:
    root: Path
    adapters: tuple[tuple[str, str, int], ...]  # (name, method, rank), version "1"


@pytest.fixture(scope="session")
def many_adapters(tmp_path_factory: pytest.TempPathFactory) -> ManyAdapters:
    """64 distinct adapters (LoRA and rsLoRA, ranks 8 and 16) under ROOT/m{i}/1: four PEFT templates, then
    clones with fresh random weights (seconds, not minutes)."""
    from effllm.common.model import resolve_model

    from ..adaptertools import make_many_adapters

    root = tmp_path_factory.mktemp("many") / "root"
    made = make_many_adapters(resolve_model(None).path, root, MANY_ADAPTERS)
    return ManyAdapters(root, tuple(made))


def _many_server(engine: str, many: ManyAdapters, logs_dir: Path) -> ServerProcess:
    return start_server(
        "--engine",
        engine,
        "--precision",  # pinned: `auto` is bf16 on a CPU with native bf16; parity is checked at fp32
        "fp32",
        "--adapter-root",
        str(many.root),
        "--max-adapter-rank",
        "16",
        "--max-adapters-per-batch",
        "8",
        "--max-adapters-resident",
        str(MANY_ADAPTERS),
        "--max-concurrency",
        "32",
        "--queue-size",
        "256",
        "--max-context",
        "512",
        "--kv-cache-gib",
        "0.25",
        log_dir=logs_dir,
        ready_timeout=900,
    )


@pytest.fixture(scope="session")
def vllm_many_server(many_adapters: ManyAdapters, logs_dir: Path) -> Iterator[ServerProcess]:
    """vLLM engine, 32 batch slots, --max-adapters-per-batch 8, room for all 64 adapters resident."""
    server = _many_server("vllm", many_adapters, logs_dir)
    yield server
    server.stop()


@pytest.fixture(scope="session")
def hf_many_server(many_adapters: ManyAdapters, logs_dir: Path) -> Iterator[ServerProcess]:
    """hf engine (fp32), same limits as vllm_many_server."""
    server = _many_server("hf", many_adapters, logs_dir)
    yield server
    server.stop()


# --- variants: the reference every engine's held-out perplexity (Engine.score) must agree with ----------
@pytest.fixture(scope="session")
def reference_perplexity() -> float:
    """The default model's held-out perplexity at fp32 by transformers (loadtest/quality.py, the reference
    implementation), in a process of its own so this one never loads torch for it."""
    from effllm.common.model import resolve_model

    out = subprocess.run(
        [sys.executable, "-m", "effllm.loadtest.quality", str(resolve_model(None).path), "fp32"],
        capture_output=True,
        text=True,
        timeout=600,
        check=True,
        env={"OMP_NUM_THREADS": "1", **os.environ},
    )
    return float(json.loads(out.stdout.strip().splitlines()[-1])["perplexity"])


def variants_by_name(client: EffllmClient) -> dict[str, pb.VariantInfo]:
    """GetModelInfo's variants, by name (the variants e2e modules)."""
    return {v.name: v for v in client.model_info().variants}


def energy_choices(variants: dict[str, pb.VariantInfo]) -> set[str]:
    """The variants an ENERGY request may go to on these figures: the lowest J/token, and every variant
    whose J/token interval overlaps its (a tie within their spread, broken by TTFT: server/router.py)."""
    best = min(variants.values(), key=lambda v: v.live.joules_per_token).live.joules
    return {
        name
        for name, v in variants.items()
        if v.live.joules.low <= max(best.high, best.median)
        and min(best.low, best.median) <= v.live.joules.high
    }


def wait_idle(client: EffllmClient, timeout: float = 60.0) -> None:
    """Until the server has nothing running or queued; AssertionError after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        s = client.stats()
        if s.running == 0 and s.queued == 0:
            return
        time.sleep(0.1)
    raise AssertionError("the server did not go idle")
