"""The tests' name for the package's synthetic adapters (effllm.tuner.synthetic)."""

from __future__ import annotations

from effllm.tuner.synthetic import DEFAULT_TARGETS, make_adapter

__all__ = ["DEFAULT_TARGETS", "make_adapter"]
