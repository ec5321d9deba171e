"""Run-dir line files with a byte cap: append whole lines, rotate to `PATH.1` past the cap, read both back.

The server's traces.jsonl and resource-samples.jsonl grow for as long as it runs (a flood of refused
requests writes several KB each); with a cap, each file holds at most about `max_bytes` and its one older
generation `PATH.1` as much again, so a run dir stays under 2 x cap per file however long the server runs.

    out = RotatingLines(run_dir / "traces.jsonl", max_bytes=100 << 20)
    out.write(line)                     # one line, no newline; rotates first if it would pass the cap
    lines = read_lines(run_dir / "traces.jsonl")   # PATH.1's lines, then PATH's

Invariant: a line is never split across the two files, and rotation happens between lines, so a reader
sees whole lines in `PATH.1` (only the last line of `PATH` may be torn by a crash). Not thread-safe: the
writer's owner locks.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import IO

DEFAULT_MAX_BYTES = 100 << 20  # per file: a busy day of traces or 10 Hz samples stays under ~400 MB


def rotated(path: Path) -> Path:
    """The older generation of `path`: PATH.1."""
    return path.with_name(path.name + ".1")


def generations(path: Path) -> list[Path]:
    """The files holding `path`'s lines, oldest first: PATH.1 (if there is one), then PATH (if there is)."""
    return [p for p in (rotated(path), path) if p.is_file()]


def read_lines(path: Path) -> list[str]:
    """Every line of PATH.1 then PATH, without newlines (FileNotFoundError when neither is there)."""
    lines: list[str] = []
    for p in generations(path) or [path]:
        lines += p.read_text(encoding="utf-8").splitlines()
    return lines


class RotatingLines:
    """Appends lines to `path`; `max_bytes` > 0: once a line would take the file past it, the file becomes
    PATH.1 (replacing the older one) and a new PATH starts. 0: no cap."""

    def __init__(self, path: Path, max_bytes: int = DEFAULT_MAX_BYTES) -> None:
        if max_bytes < 0:
            raise ValueError(f"max_bytes {max_bytes} must be >= 0 (0: no cap)")
        self.path = Path(path)
        self.max_bytes = max_bytes
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file: IO[str] | None = self.path.open("a", encoding="utf-8")
        self._size = self.path.stat().st_size

    @property
    def closed(self) -> bool:
        return self._file is None

    def write(self, line: str, *, flush: bool = True) -> None:
        if self._file is None:
            raise ValueError(f"{self.path}: closed")
        data = line + "\n"
        n = len(data.encode("utf-8")) if not data.isascii() else len(data)
        if self.max_bytes and self._size and self._size + n > self.max_bytes:
            self._file.close()
            os.replace(self.path, rotated(self.path))
            self._file = self.path.open("a", encoding="utf-8")
            self._size = 0
        self._file.write(data)
        self._size += n
        if flush:
            self._file.flush()

    def flush(self) -> None:
        if self._file is not None:
            self._file.flush()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
