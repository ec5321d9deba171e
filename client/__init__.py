"""The effllm Python client: `EffllmClient` (blocking) and `AsyncEffllmClient` (asyncio)."""

from .channel import ClientSecurity
from .client import AsyncEffllmClient, EffllmClient, build_request

__all__ = ["AsyncEffllmClient", "ClientSecurity", "EffllmClient", "build_request"]
