"""vLLM's finish reasons as ours: every one vLLM can report maps, and `error` fails that request with
INTERNAL instead of looking like a normal stop; an eager engine core on CPU runs without torch.compile (its
environment only: the server process keeps it)."""

from __future__ import annotations

import os
import subprocess
import sys

import grpc
import pytest

from effllm.api.errors import EffllmError
from effllm.api.status import grpc_status
from effllm.server.engines.vllm_engine import (
    VllmConfig,
    child_environment,
    engine_core_env,
    finish_reason,
)


def test_every_vllm_finish_reason_maps() -> None:
    from vllm.v1.engine import FINISH_REASON_STRINGS, FinishReason

    assert {str(r) for r in FinishReason} == set(FINISH_REASON_STRINGS)
    ours = {r: finish_reason(r, "req") for r in FINISH_REASON_STRINGS if r != "error"}
    assert ours == {"stop": "stop", "length": "length", "abort": "cancelled", "repetition": "stop"}
    assert finish_reason(None, "req") == "stop"


def test_an_error_finish_is_internal_for_that_request() -> None:
    with pytest.raises(EffllmError) as err:
        finish_reason("error", "req-7")
    assert err.value.code == "internal" and "req-7" in str(err.value)
    assert grpc_status(err.value.code) == grpc.StatusCode.INTERNAL


def test_an_eager_cpu_engine_core_runs_without_torch_compile_and_the_server_keeps_it() -> None:
    assert engine_core_env(VllmConfig()) == {"TORCH_COMPILE_DISABLE": "1"}
    assert engine_core_env(VllmConfig(enforce_eager=False)) == {}  # --vllm-compile: Inductor wanted
    assert engine_core_env(VllmConfig(device="cuda")) == {}
    before = os.environ.get("TORCH_COMPILE_DISABLE")
    with child_environment({"TORCH_COMPILE_DISABLE": "1"}):
        import torch._dynamo

        seen = subprocess.run(
            [sys.executable, "-c", "import os; print(os.environ.get('TORCH_COMPILE_DISABLE'))"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        assert torch._dynamo.config.disable is (before == "1")  # this process read its setting before
    assert seen == "1" and os.environ.get("TORCH_COMPILE_DISABLE") == before
