"""The tests' name for the package's synthetic adapters (effllm.tuner.synthetic)."""

from __future__ import annotations

from effllm.tuner.synthetic import DEFAULT_TARGETS, clone_adapter, make_adapter, make_many_adapters

__all__ = ["DEFAULT_TARGETS", "clone_adapter", "make_adapter", "make_many_adapters"]
