"""The adapter-reference grammar of the wire contract: `NAME` or `NAME@VERSION`.

Invariant: this is the only place the grammar is written; the service's request check and the adapter
root's path resolution (common/adapter_paths.py) both use it, so they can never disagree.
"""

from __future__ import annotations

import re

NAME_MAX = 128
VERSION_MAX = 64
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
VERSION = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
REF = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}(@[A-Za-z0-9][A-Za-z0-9._-]{0,63})?$")


def is_ref(ref: str) -> bool:
    """True for "NAME" or "NAME@VERSION" (the empty reference, the base model, is the caller's case)."""
    return bool(REF.match(ref))
