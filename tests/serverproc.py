"""Tests start real servers through the client's launcher."""

from effllm.client.launch import ServerProcess, free_port, start_server, wait_serving

__all__ = ["ServerProcess", "free_port", "start_server", "wait_serving"]
