"""The effllm Python client: `EffllmClient` (blocking) and `AsyncEffllmClient` (asyncio)."""

from .client import AsyncEffllmClient, EffllmClient, build_request

__all__ = ["AsyncEffllmClient", "EffllmClient", "build_request"]
