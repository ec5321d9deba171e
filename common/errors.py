"""The one error type that carries a status across the process boundary: engines, the adapter root and the
service raise it, and the gRPC layer maps `code` onto a gRPC status (server/service.py)."""

from __future__ import annotations

from typing import Literal

ErrorCode = Literal[
    "invalid_argument", "not_found", "failed_precondition", "resource_exhausted", "unavailable", "internal"
]


class EngineError(Exception):
    """A request-level failure with a status the service maps onto gRPC codes."""

    def __init__(self, code: ErrorCode, message: str) -> None:
        super().__init__(message)
        self.code: ErrorCode = code
        self.message = message
