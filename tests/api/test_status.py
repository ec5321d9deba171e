"""Every error code has a gRPC status, and none of them is UNKNOWN."""

from __future__ import annotations

import typing

import grpc

from effllm.api.errors import ErrorCode
from effllm.api.refs import is_ref
from effllm.api.status import STATUS


def test_every_error_code_maps_to_a_named_status() -> None:
    assert set(typing.get_args(ErrorCode)) == set(STATUS)
    assert grpc.StatusCode.UNKNOWN not in STATUS.values()


def test_adapter_reference_grammar() -> None:
    assert is_ref("sql") and is_ref("sql@3") and is_ref("a.b-c_d@v1.2")
    assert (
        not is_ref("")
        and not is_ref("@1")
        and not is_ref("sql@")
        and not is_ref("../x")
        and not is_ref("a@b@c")
    )
