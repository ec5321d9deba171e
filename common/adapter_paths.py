"""Resolve adapter names, versions and relative paths to folders strictly inside the adapter root.

Invariant: every path this module returns, and every file inside it that we read, resolves (symlinks
followed) to a location under the adapter root; anything else is an `invalid_argument` EffllmError.
Names and versions are single path components from a small alphabet, never "." / ".." / hidden.
"""

from __future__ import annotations

import re
from pathlib import Path, PurePosixPath

from ..api.errors import EffllmError
from ..api.refs import NAME as _NAME
from ..api.refs import VERSION as _VERSION


def _check(pattern: re.Pattern[str], value: str, field: str, what: str, most: int) -> str:
    if not pattern.match(value or ""):
        raise EffllmError(
            "invalid_argument",
            f"{field}: {value[:80]!r} is not a valid {what} (1-{most} of letters, digits, . _ -; "
            "starting with a letter or digit)",
        )
    return value


def check_name(name: str, field: str = "name") -> str:
    return _check(_NAME, name, field, "adapter name", 128)


def check_version(version: str, field: str = "version") -> str:
    return _check(_VERSION, version, field, "version", 64)


def parse_ref(ref: str) -> tuple[str, str]:
    """ "NAME" -> (NAME, ""); "NAME@VERSION" -> (NAME, VERSION); raises invalid_argument otherwise."""
    name, sep, version = ref.partition("@")
    check_name(name, "adapter")
    if sep:
        check_version(version, "adapter")
    return name, version


def numeric_versions(root: Path, name: str) -> list[int]:
    """Versions present on disk under ROOT/NAME that are positive integers, ascending."""
    folder = root / name
    if not folder.is_dir():
        return []
    found = []
    for child in folder.iterdir():
        if child.name.isdigit() and child.is_dir() and int(child.name) > 0:
            found.append(int(child.name))
    return sorted(found)


def inside(root: Path, candidate: Path, field: str) -> Path:
    """`candidate` with symlinks resolved, if it stays under `root`; invalid_argument otherwise."""
    real_root = root.resolve()
    real = candidate.resolve()
    if real != real_root and real_root not in real.parents:
        raise EffllmError("invalid_argument", f"{field}: resolves outside the adapter root")
    return real


def resolve_version_dir(root: Path, name: str, version: str) -> tuple[str, Path]:
    """ROOT/NAME/VERSION; an empty version picks the highest integer version on disk."""
    check_name(name)
    if not version:
        versions = numeric_versions(root, name)
        if not versions:
            raise EffllmError("not_found", f"name: no versions of {name!r} under the adapter root")
        version = str(versions[-1])
    check_version(version)
    folder = root / name / version
    if not folder.is_dir():
        raise EffllmError("not_found", f"version: {name}/{version} does not exist under the adapter root")
    return version, inside(root, folder, "version")


def resolve_relative(root: Path, rel: str) -> Path:
    """A folder given relative to the root: no absolute paths, no "..", no hidden or odd components."""
    if not rel or "\x00" in rel or "\\" in rel:
        raise EffllmError("invalid_argument", "path: must be a non-empty relative path with / separators")
    pure = PurePosixPath(rel)
    if pure.is_absolute():
        raise EffllmError(
            "invalid_argument", f"path: {rel[:80]!r} is absolute; give it relative to the adapter root"
        )
    for part in pure.parts:
        if part in (".", ".."):
            raise EffllmError(
                "invalid_argument", f"path: {rel[:80]!r} contains {part!r}; it may not leave the root"
            )
        if not _NAME.match(part):
            raise EffllmError("invalid_argument", f"path: component {part[:80]!r} is not a valid folder name")
    folder = root.joinpath(*pure.parts)
    real = inside(root, folder, "path")
    if not real.is_dir():
        raise EffllmError("not_found", f"path: {rel!r} is not a folder under the adapter root")
    return real


def file_inside(root: Path, folder: Path, filename: str) -> Path:
    """A file in an adapter folder; a symlink that points out of the root is refused."""
    return inside(root, folder / filename, f"path: {filename}")
