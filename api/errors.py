"""The one error type that carries a status across every boundary: engines, the adapter root, the tuner and
the services raise it, and the gRPC layer maps `code` onto a gRPC status (api/status.py).

Invariant: a code is one of `ErrorCode`; every code has exactly one gRPC status in api/status.py.
"""

from __future__ import annotations

from typing import Literal

ErrorCode = Literal[
    "invalid_argument",
    "not_found",
    "failed_precondition",
    "resource_exhausted",
    "unavailable",
    "unauthenticated",
    "permission_denied",
    "internal",
]


class EffllmError(Exception):
    """A request-level failure with a status code the services map onto gRPC codes."""

    def __init__(self, code: ErrorCode, message: str) -> None:
        super().__init__(message)
        self.code: ErrorCode = code
        self.message = message
