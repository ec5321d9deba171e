"""Shared fixtures: one real vLLM-engine server for the whole session (starting one costs ~25 s), and the
test tiers.

Tiers: a test that needs the real model, a real engine or a real server is marked `model` — every test
under tests/e2e/ and every test using a fixture of MODEL_FIXTURES is marked here; a module that loads the
model itself says `pytestmark = pytest.mark.model`. `bash scripts/test.sh --fast` runs the rest
(`-m "not model"`) with EFFLLM_TEST_TIER=fast, under which resolving the default model fails the test:
Invariant: a fast-tier test that would load the model fails (naming the marker) instead of running slowly.
"""

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

# Fixtures that start a real server or load the real model: a test using one is in the `model` tier.
MODEL_FIXTURES = frozenset({"vllm_server", "adapter_root"})


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        fixtures = set(getattr(item, "fixturenames", ()))
        if "e2e" in item.path.parts or fixtures & MODEL_FIXTURES:
            item.add_marker(pytest.mark.model)


def pytest_configure(config: pytest.Config) -> None:
    if os.environ.get("EFFLLM_TEST_TIER") != "fast":
        return
    from effllm.common import model

    def refuse() -> Path:
        raise RuntimeError("the fast tier loads no model: mark this test (or its module) `pytest.mark.model`")

    model._ensure_default_checkpoint = refuse  # type: ignore[assignment]
    model._ensure_catalogue_checkpoint = lambda entry: refuse()  # type: ignore[assignment]


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
