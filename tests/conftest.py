"""Shared fixtures: one real vLLM-engine server for the whole session (starting one costs ~25 s)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from .adapterroot import AdapterRoot, build_adapter_root
from .serverproc import ServerProcess, start_server

# Every server a test starts inherits this: OpenTelemetry's BatchSpanProcessor exports every 0.2 s instead of
# every 5 s (the SDK's default), so tests and load campaigns waiting for a request's span wait that much less.
os.environ.setdefault("OTEL_BSP_SCHEDULE_DELAY", "200")


@pytest.fixture(scope="session")
def logs_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("logs")


@pytest.fixture(scope="session")
def vllm_server(logs_dir: Path) -> Iterator[ServerProcess]:
    """The default model on the vLLM engine, fp32, 8 batch slots and a queue of 32."""
    server = start_server(
        "--engine",
        "vllm",
        "--precision",
        "fp32",  # pinned: `auto` follows the machine (bf16 where the CPU has it natively)
        "--max-concurrency",
        "8",
        "--queue-size",
        "32",
        "--max-context",
        "1024",
        "--kv-cache-gib",
        "0.5",
        log_dir=logs_dir,
    )
    yield server
    server.stop()


@pytest.fixture(scope="session")
def adapter_root(tmp_path_factory: pytest.TempPathFactory) -> AdapterRoot:
    """Real PEFT adapters on the default base (see tests/adapterroot.py); built once per session."""
    from effllm.common.model import resolve_model

    model = resolve_model(None)
    return build_adapter_root(tmp_path_factory.mktemp("adapters"), model.path, model.fingerprint)
