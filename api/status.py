"""The one table from `EffllmError.code` to gRPC status, for every service (generation, adapters, tuning).

Invariant: every `ErrorCode` has an entry (tests/api/test_status.py); nothing maps onto UNKNOWN.
"""

from __future__ import annotations

import grpc

from .errors import ErrorCode

STATUS: dict[ErrorCode, grpc.StatusCode] = {
    "invalid_argument": grpc.StatusCode.INVALID_ARGUMENT,
    "not_found": grpc.StatusCode.NOT_FOUND,
    "failed_precondition": grpc.StatusCode.FAILED_PRECONDITION,
    "resource_exhausted": grpc.StatusCode.RESOURCE_EXHAUSTED,
    "unavailable": grpc.StatusCode.UNAVAILABLE,
    "unauthenticated": grpc.StatusCode.UNAUTHENTICATED,
    "permission_denied": grpc.StatusCode.PERMISSION_DENIED,
    "internal": grpc.StatusCode.INTERNAL,
}


def grpc_status(code: ErrorCode) -> grpc.StatusCode:
    return STATUS[code]
