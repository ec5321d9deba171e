"""effllm's wire contract: generated stubs (`effllm.api.v1`), the status table, the adapter-reference
grammar and the typed error. It imports nothing else of ours, so every package may import it."""

from .errors import EffllmError, ErrorCode

__all__ = ["EffllmError", "ErrorCode"]
