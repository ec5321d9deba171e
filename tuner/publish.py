"""Publish a finished adapter into a server's adapter root as NAME's next version, then load it there.

The on-disk half is `common/manifest.publish`, the code the server's adapter root uses too (one schema,
one atomic rename: ROOT/NAME/VERSION appears whole or not at all, racing publishers take the next number);
the tuner adds name checks that speak its own errors and the LoadAdapter call.
"""

from __future__ import annotations

import os
from pathlib import Path

from effllm.api.errors import EffllmError
from effllm.api.v1 import adapters_pb2 as apb
from effllm.client import EffllmClient
from effllm.client.channel import ClientSecurity
from effllm.common import manifest
from effllm.common.adapter_paths import check_name as _check_name


def check_name(name: str) -> None:
    try:
        _check_name(name)
    except EffllmError as exc:
        raise ValueError(str(exc)) from exc


def default_adapter_root() -> Path | None:
    root = os.environ.get("EFFLLM_ADAPTER_ROOT")
    return Path(root) if root else None


def next_version(root: Path, name: str) -> str:
    check_name(name)
    return manifest.next_version(root, name)


def publish(src_dir: Path, root: Path, name: str) -> str:
    """Copy `src_dir` (an adapter with manifest.json) to ROOT/NAME/<next version>; returns the version."""
    check_name(name)
    return manifest.publish(src_dir, root, name)


def load_on_server(
    target: str, name: str, version: str, timeout: float = 120.0, *, security: ClientSecurity | None = None
) -> apb.AdapterInfo:
    """AdapterService.LoadAdapter(NAME, VERSION) on the running server; grpc.RpcError carries its status."""
    with EffllmClient(target, timeout=timeout, security=security) as client:
        return client.load_adapter(name, version)
