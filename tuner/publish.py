"""Publish a finished adapter into a server's adapter root as NAME's next version, then load it there.

Invariant: the version folder ROOT/NAME/VERSION appears whole or not at all (copied into a hidden staging dir
beside it, then renamed), so a server scanning the root never sees a partial adapter; a second publisher
racing for the same version number takes the next one.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from pathlib import Path

import grpc
from effllm.client.v1 import adapters_pb2 as apb
from effllm.client.v1 import adapters_pb2_grpc as apb_grpc

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


def check_name(name: str) -> None:
    if not _NAME.match(name):
        raise ValueError(f"name: {name!r} must be 1-128 of [A-Za-z0-9._-], starting with a letter or digit")


def default_adapter_root() -> Path | None:
    root = os.environ.get("EFFLLM_ADAPTER_ROOT")
    return Path(root) if root else None


def next_version(root: Path, name: str) -> str:
    folder = root / name
    versions = [int(p.name) for p in folder.iterdir() if p.name.isdigit()] if folder.is_dir() else []
    return str(max(versions, default=0) + 1)


def publish(src_dir: Path, root: Path, name: str) -> str:
    """Copy `src_dir` (an adapter with manifest.json) to ROOT/NAME/<next version>; returns the version."""
    check_name(name)
    folder = root / name
    folder.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".staging-", dir=folder))
    try:
        shutil.copytree(src_dir, staging, dirs_exist_ok=True)
        staging.chmod(0o755)
        for _ in range(100):
            version = next_version(root, name)
            manifest_path = staging / "manifest.json"
            if manifest_path.is_file():
                m = json.loads(manifest_path.read_text())
                m.update(name=name, version=version)
                manifest_path.write_text(json.dumps(m, indent=2) + "\n")
            try:
                os.rename(staging, folder / version)  # refuses a non-empty existing target
                return version
            except OSError:
                if not (folder / version).exists():
                    raise
        raise RuntimeError(f"publish: could not claim a version under {folder}")
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def load_on_server(target: str, name: str, version: str, timeout: float = 120.0) -> apb.AdapterInfo:
    """AdapterService.LoadAdapter(NAME, VERSION) on the running server; grpc.RpcError carries its status."""
    with grpc.insecure_channel(target) as channel:
        stub = apb_grpc.AdapterServiceStub(channel)
        return stub.LoadAdapter(apb.LoadAdapterRequest(name=name, version=version), timeout=timeout)
