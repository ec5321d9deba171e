"""manifest.json: what an adapter version is, where it came from; plus versioning and atomic publish.

The schema is shared with the tuner (which writes manifests) and the registry (which reads them).
Every field is optional so that hand-made manifests load; unknown keys survive a read/write round trip.
Invariant of `publish`: ROOT/NAME/VERSION either does not exist or is complete (copy into a hidden
temp folder beside it, fsync, then one rename).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import shutil
import stat
import tempfile
import time
from dataclasses import asdict, dataclass, field, fields, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from .adapter_paths import check_name, file_inside, numeric_versions

MANIFEST = "manifest.json"
MAX_JSON_BYTES = 1 << 20  # adapter_config.json and manifest.json: real ones are a few KiB
# The files whose bytes make an adapter version what it is (the manifest only describes it).
CONTENT_FILES = ("adapter_config.json", "adapter_model.safetensors")
_MAX_RANK = 1 << 16
_MAX_ALPHA = 1e6
SERVE_METHODS = ("lora", "rslora", "dora")
TUNING_METHODS = ("lora", "lora_plus", "rslora", "dora", "freeze", "full")


@dataclass(frozen=True)
class Manifest:
    name: str = ""
    version: str = ""
    method: str = ""  # how it is served: lora | rslora | dora
    tuning_method: str = ""  # how it was trained: lora | lora_plus | rslora | dora | freeze | full
    rank: int = 0
    alpha: float = 0.0
    target_modules: tuple[str, ...] = ()
    base_model: str = ""
    base_fingerprint: str = ""  # sha256 from common/model.py fingerprint()
    content_sha256: str = ""  # content_hash() of the version's files, written by publish
    created_at: str = ""  # ISO 8601
    dataset: dict[str, Any] = field(default_factory=dict)
    hyperparameters: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)  # unknown keys, kept as they were

    def __post_init__(self) -> None:
        if self.method and self.method not in SERVE_METHODS:
            raise ValueError(f"method: {self.method!r} is not one of {', '.join(SERVE_METHODS)}")
        if self.tuning_method and self.tuning_method not in TUNING_METHODS:
            raise ValueError(
                f"tuning_method: {self.tuning_method!r} is not one of {', '.join(TUNING_METHODS)}"
            )
        if not 0 <= self.rank <= _MAX_RANK:
            raise ValueError(f"rank: {self.rank} is out of range 0..{_MAX_RANK}")
        if not (math.isfinite(self.alpha) and 0 <= self.alpha <= _MAX_ALPHA):
            raise ValueError(f"alpha: {self.alpha} is out of range 0..{_MAX_ALPHA:g}")
        if self.content_sha256 and not _SHA256.fullmatch(self.content_sha256):
            raise ValueError("content_sha256: is not 64 lowercase hex digits")
        if self.created_at:
            try:
                datetime.fromisoformat(self.created_at.replace("Z", "+00:00"))
            except ValueError as exc:
                raise ValueError(f"created_at: {self.created_at!r} is not ISO 8601") from exc

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Manifest:
        if not isinstance(data, dict):
            raise ValueError("manifest must be a JSON object")
        if (where := nonfinite_path(data)) is not None:
            raise ValueError(f"{where}: is not a finite number")
        known = {f.name for f in fields(cls)} - {"extra"}
        kw: dict[str, Any] = {}
        for key in known & data.keys():
            value = data[key]
            if value is None:
                continue
            if key in ("rank",):
                if not isinstance(value, int) or isinstance(value, bool):
                    raise ValueError(f"{key}: {value!r} is not an integer")
            elif key == "alpha":
                if not isinstance(value, (int, float)) or isinstance(value, bool):
                    raise ValueError(f"alpha: {value!r} is not a number")
                value = float(value)
            elif key == "target_modules":
                if isinstance(value, str):
                    value = [value]
                if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                    raise ValueError("target_modules: must be a list of strings")
                value = tuple(value)
            elif key in ("dataset", "hyperparameters", "metrics"):
                if not isinstance(value, dict):
                    raise ValueError(f"{key}: must be an object")
            elif not isinstance(value, str):
                raise ValueError(f"{key}: {value!r} is not a string")
            kw[key] = value
        extra = {k: v for k, v in data.items() if k not in known}
        return cls(**kw, extra=extra)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        extra = data.pop("extra")
        data["target_modules"] = list(self.target_modules)
        if not self.content_sha256:  # absent rather than "" (manifests written before it existed)
            del data["content_sha256"]
        return {**extra, **data}


def now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


_SHA256 = re.compile(r"[0-9a-f]{64}")


def nonfinite_path(value: Any, where: str = "") -> str | None:
    """The dotted path of the first NaN/inf float inside a parsed JSON value, None when all are finite.
    Iterative: a hostile file nests deeper than Python's recursion limit."""
    stack: list[tuple[Any, str]] = [(value, where)]
    while stack:
        item, at = stack.pop()
        if isinstance(item, float) and not math.isfinite(item):
            return at or "(top level)"
        if isinstance(item, dict):
            stack.extend((v, f"{at}.{k}" if at else str(k)) for k, v in item.items())
        elif isinstance(item, list):
            stack.extend((v, f"{at}[{i}]") for i, v in enumerate(item))
    return None


def read_json_limited(path: Path, label: str, limit: int = MAX_JSON_BYTES) -> Any:
    """Parse a small JSON file without trusting it: a regular file (no FIFO, device or final symlink),
    at most `limit` bytes (checked before reading, and the read itself is bounded, so a 2 GB sparse file
    costs one fstat), valid UTF-8 JSON. ValueError naming `label` otherwise."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError as exc:
        raise ValueError(f"{label}: cannot be opened ({exc.strerror})") from exc
    with os.fdopen(fd, "rb") as fh:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise ValueError(f"{label}: is not a regular file")
        if st.st_size > limit:
            raise ValueError(f"{label}: {st.st_size} bytes is over the {limit}-byte limit")
        raw = fh.read(limit + 1)
    if len(raw) > limit:  # grew after the fstat
        raise ValueError(f"{label}: over the {limit}-byte limit")
    try:
        return json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        # ValueError covers JSONDecodeError and ints over Python's digit limit
        raise ValueError(f"{label}: unreadable, not valid JSON ({str(exc)[:120]})") from exc


def read_manifest(folder: Path, root: Path | None = None) -> Manifest | None:
    """The folder's manifest, None when it has none; ValueError when it is there but malformed.

    With `root`, manifest.json must resolve inside it (the same rule as every adapter file: an
    invalid_argument EffllmError otherwise, which never shows the outside file's content)."""
    path = file_inside(root, folder, MANIFEST) if root is not None else folder / MANIFEST
    if not path.exists() and not path.is_symlink():
        return None
    return Manifest.from_dict(read_json_limited(path, MANIFEST))


def content_hash(folder: Path, root: Path | None = None) -> str:
    """sha256 over an adapter version's content: for each of CONTENT_FILES in order, its name, a NUL,
    its length (8 bytes, little endian) and its bytes. Two versions with equal hashes serve alike.
    With `root`, each file must resolve inside it and is opened without following a final link."""
    digest = hashlib.sha256()
    for name in CONTENT_FILES:
        path = file_inside(root, folder, name) if root is not None else folder / name
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
        except OSError as exc:
            raise ValueError(f"{name}: cannot be opened ({exc.strerror})") from exc
        with os.fdopen(fd, "rb") as fh:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise ValueError(f"{name}: is not a regular file")
            digest.update(name.encode() + b"\0" + st.st_size.to_bytes(8, "little"))
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                digest.update(chunk)
    return digest.hexdigest()


def write_manifest(folder: Path, manifest: Manifest) -> Path:
    path = folder / MANIFEST
    tmp = path.with_name(f".{MANIFEST}.tmp")
    with tmp.open("w") as fh:
        json.dump(manifest.to_dict(), fh, indent=2, sort_keys=True)
        fh.write("\n")
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    return path


def next_version(root: Path, name: str) -> str:
    """One above the highest integer version of NAME on disk ("1" for a new name)."""
    check_name(name)
    versions = numeric_versions(root, name)
    return str(versions[-1] + 1 if versions else 1)


def _fsync_tree(folder: Path) -> None:
    for dirpath, _dirs, files in os.walk(folder):
        for f in files:
            fd = os.open(os.path.join(dirpath, f), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        _fsync_dir(Path(dirpath))


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


STALE_STAGING_S = 3600.0  # a live publisher's staging folder is minutes old at most


def sweep_stale_staging(parent: Path, older_than_s: float = STALE_STAGING_S) -> list[Path]:
    """Remove `.tmp-*` staging folders that a killed publisher left in ROOT/NAME; return what went."""
    cutoff = time.time() - older_than_s
    gone = []
    for tmp in parent.glob(".tmp-*"):
        try:
            if tmp.is_dir() and not tmp.is_symlink() and tmp.stat().st_mtime < cutoff:
                shutil.rmtree(tmp)
                gone.append(tmp)
        except OSError:  # another publisher swept it first
            continue
    return gone


def publish(src_dir: Path, root: Path, name: str, *, attempts: int = 100) -> str:
    """Copy `src_dir` into ROOT/NAME/<next version> atomically and return that version.

    The copy's manifest (written if absent) gets this name and version. Two publishers racing for one
    version: the loser's rename fails and it takes the next number (each loss means another publisher won,
    so `attempts` bounds the racers, not the retries of one).
    """
    check_name(name)
    src_dir = Path(src_dir)
    if not src_dir.is_dir():
        raise FileNotFoundError(f"publish: {src_dir} is not a folder")
    parent = Path(root) / name
    parent.mkdir(parents=True, exist_ok=True)
    sweep_stale_staging(parent)
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=parent))
    try:
        staged = tmp / "adapter"
        shutil.copytree(src_dir, staged, symlinks=False)
        base = read_manifest(staged) or Manifest(created_at=now_iso())
        whole = all((staged / f).is_file() for f in CONTENT_FILES)  # a PEFT adapter, not a full model
        content = content_hash(staged) if whole else ""
        for _ in range(attempts):
            version = next_version(Path(root), name)
            write_manifest(
                staged,
                replace(
                    base,
                    name=name,
                    version=version,
                    created_at=base.created_at or now_iso(),
                    content_sha256=content,
                ),
            )
            _fsync_tree(staged)
            target = parent / version
            if target.exists():
                continue
            try:
                os.rename(staged, target)  # atomic on one filesystem
            except OSError:
                continue  # someone else took this version between our check and the rename
            _fsync_dir(parent)
            return version
        raise RuntimeError(f"publish: could not claim a version of {name!r} after {attempts} attempts")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
