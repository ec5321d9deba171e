"""Private copies of adapter versions: the engine only ever reads what was validated.

Why: the registry validates an adapter folder, then the engine reads it again (vLLM's worker at add time,
and again whenever its CPU cache has to reload it). A file cut short, replaced or deleted in between killed
vLLM's engine core — a worker exception in add_lora is fatal to vLLM (found by tests/e2e/test_faults.py).
So the registry validates the folder in the root (path rules: nothing may escape it), copies its files into
a staging folder this server owns, validates the copy (a file damaged during the copy fails here, cleanly),
and hands the engine the copy; the copy is removed when the version leaves. Invariant: nothing outside
this process writes to a snapshot, so what the engine loads is what was checked.
"""

from __future__ import annotations

import shutil
import tempfile
import uuid
from pathlib import Path

from ..engines.base import EffllmError

REQUIRED = ("adapter_config.json", "adapter_model.safetensors")
OPTIONAL = ("manifest.json",)


class Snapshots:
    def __init__(self) -> None:
        self._root: Path | None = None

    @property
    def root(self) -> Path:
        if self._root is None:  # made on first use: a server without adapters never creates it
            self._root = Path(tempfile.mkdtemp(prefix="effllm-adapters-"))
        return self._root

    def take(self, folder: Path, key: str) -> Path:
        """Copy `folder`'s adapter files (already validated in place) into a new private folder."""
        dest = self.root / f"{key.replace('@', '-')}-{uuid.uuid4().hex[:8]}"
        dest.mkdir()
        for name in (*REQUIRED, *OPTIONAL):
            try:
                shutil.copyfile(folder / name, dest / name)
            except FileNotFoundError as exc:
                if name in OPTIONAL:
                    continue
                shutil.rmtree(dest, ignore_errors=True)
                raise EffllmError(
                    "failed_precondition", f"{name}: vanished from {folder.name}/ while it was being loaded"
                ) from exc
        return dest

    def drop(self, path: Path) -> None:
        if self._root is not None and path.parent == self._root:
            shutil.rmtree(path, ignore_errors=True)

    def close(self) -> None:
        if self._root is not None:
            shutil.rmtree(self._root, ignore_errors=True)
            self._root = None
