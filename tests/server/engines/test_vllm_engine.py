"""vLLM's finish reasons as ours: every one vLLM can report maps, and `error` fails that request with
INTERNAL instead of looking like a normal stop."""

from __future__ import annotations

import grpc
import pytest

from effllm.api.errors import EffllmError
from effllm.api.status import grpc_status
from effllm.server.engines.vllm_engine import finish_reason


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
