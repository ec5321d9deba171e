"""Private copies of adapter versions: the engine only ever reads what was validated.

Why: the registry validates an adapter folder, then the engine reads it again (vLLM's worker at add time,
and again whenever its CPU cache has to reload it). A file cut short, replaced or deleted in between killed
vLLM's engine core — a worker exception in add_lora is fatal to vLLM (found by tests/e2e/test_faults.py).
So the registry validates the folder in the root (path rules: nothing may escape it), copies its files into
a staging folder this server owns, validates the copy (a file damaged during the copy fails here, cleanly),
and hands the engine the copy; the copy is removed when the version leaves.

Copying never follows a link out of the root: each file is resolved, checked inside the root, and opened
with O_NOFOLLOW (a link swapped in after the check fails the open), and must be a regular file.
The staging folder is named `effllm-adapters-<pid>-*`: a server removes its own at exit and, at start,
those of servers that are gone (killed before they could clean up).

The copy is also where the version's content hash is taken (common/manifest.py content_hash, over the bytes
as they are written): each file is read once per load, not once to copy and again to hash.

Invariant: nothing outside this process writes to a snapshot, so what the engine loads is what was checked.
"""

from __future__ import annotations

import atexit
import logging
import os
import shutil
import stat
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any

from ...common.adapter_paths import file_inside
from ...common.manifest import CONTENT_FILES
from ..engines.base import EffllmError

log = logging.getLogger(__name__)

REQUIRED = CONTENT_FILES  # adapter_config.json, adapter_model.safetensors: what the content hash covers
OPTIONAL = ("manifest.json",)
PREFIX = "effllm-adapters-"
_LEGACY_STALE_S = 24 * 3600.0  # folders named before the pid was in the name: removed once this old


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, another user's
        return True
    return True


def sweep_stale(parent: Path | None = None) -> list[Path]:
    """Remove this user's snapshot folders whose owning server process is dead; return what went."""
    parent = Path(parent or tempfile.gettempdir())
    gone: list[Path] = []
    uid = os.getuid()
    for folder in parent.glob(f"{PREFIX}*"):
        try:
            st = folder.lstat()
            if not stat.S_ISDIR(st.st_mode) or st.st_uid != uid:
                continue
            owner = folder.name[len(PREFIX) :].split("-", 1)[0]
            if owner.isdigit():
                stale = int(owner) != os.getpid() and not _pid_alive(int(owner))
            else:  # an older server's folder with no pid in its name
                stale = time.time() - st.st_mtime > _LEGACY_STALE_S
            if stale:
                shutil.rmtree(folder)
                gone.append(folder)
        except OSError:  # another server swept it first, or it is not ours to remove
            continue
    if gone:
        log.info("removed %d adapter snapshot folders of servers that are gone", len(gone))
    return gone


def _copy_file(src: Path, dest: Path, digest: Any = None) -> None:
    """Copy one regular file without following a final symlink (O_NOFOLLOW) nor blocking on a FIFO.
    With `digest` (a hashlib object), feed it content_hash's record of the file: its name, a NUL, its
    length (8 bytes, little endian), then the bytes exactly as written to `dest`."""
    fd = os.open(src, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    with os.fdopen(fd, "rb") as fin:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise EffllmError("failed_precondition", f"{src.name}: is not a regular file")
        with dest.open("xb") as fout:
            if digest is None:
                shutil.copyfileobj(fin, fout, 1 << 20)
                return
            # The length goes into the hash before the bytes: a file that grows or shrinks while it is
            # copied would hash as something it never was, so it is refused (a retry copies it whole).
            digest.update(dest.name.encode() + b"\0" + st.st_size.to_bytes(8, "little"))
            copied = 0
            while chunk := fin.read(1 << 20):
                fout.write(chunk)
                digest.update(chunk)
                copied += len(chunk)
            if copied != st.st_size:
                raise EffllmError(
                    "failed_precondition",
                    f"{src.name}: changed size while it was being loaded ({st.st_size} -> {copied} bytes)",
                )


class Snapshots:
    def __init__(self, parent: Path | None = None) -> None:
        self._parent = parent
        self._root: Path | None = None
        # Loads run in worker threads: without the lock two first loads at once each made a root, and the
        # copy taken under the first was then refused as "outside" the second (a spurious INVALID_ARGUMENT).
        self._made = threading.Lock()

    @property
    def root(self) -> Path:
        with self._made:
            if self._root is None:  # made on first use: a server without adapters never creates it
                sweep_stale(self._parent)
                self._root = Path(tempfile.mkdtemp(prefix=f"{PREFIX}{os.getpid()}-", dir=self._parent))
                atexit.register(self.close)
            return self._root

    def take(self, folder: Path, key: str, root: Path, digest: Any = None) -> Path:
        """Copy `folder`'s adapter files (already validated in place under `root`) into a new private
        folder. A file that now resolves outside `root` or is no longer a regular file is refused.
        `digest` (hashlib.sha256()): fed the copy's content as it is written, so that its hexdigest()
        is manifest.content_hash of the new folder without reading it again."""
        dest = self.root / f"{key.replace('@', '-')}-{uuid.uuid4().hex[:8]}"
        dest.mkdir()
        try:
            for name in (*REQUIRED, *OPTIONAL):
                src = file_inside(root, folder, name)
                try:
                    _copy_file(src, dest / name, digest if name in REQUIRED else None)
                except FileNotFoundError as exc:
                    if name in OPTIONAL:
                        continue
                    gone = f"{name}: vanished from {folder.name}/ while it was being loaded"
                    raise EffllmError("failed_precondition", gone) from exc
                except OSError as exc:  # ELOOP: a link swapped in after the check; EACCES...
                    why = f"{name}: cannot be copied ({exc.strerror})"
                    raise EffllmError("failed_precondition", why) from exc
        except BaseException:
            shutil.rmtree(dest, ignore_errors=True)
            raise
        return dest

    def drop(self, path: Path) -> None:
        if self._root is not None and path.parent == self._root:
            shutil.rmtree(path, ignore_errors=True)

    def close(self) -> None:
        if self._root is not None:
            shutil.rmtree(self._root, ignore_errors=True)
            self._root = None
