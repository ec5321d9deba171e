"""The model's own sampling defaults, from its generation_config.json, as vLLM takes them.

A request leaves a sampling field unset to mean "the model's default": the checkpoint's
generation_config.json where it sets the key (temperature, top_p, top_k, repetition_penalty,
max_new_tokens), else the server's built-in value (temperature 1, top_p 1, top_k off, no penalty,
--default-max-new-tokens). `do_sample: false` or `temperature: 0` in the file means greedy.
Invariant: the file is read once at start-up, treated as hostile (size-capped, every value type- and
range-checked; a bad value is ignored with a warning, never a crash) and no torch is imported here.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger("effllm.server")

GENERATION_CONFIG = "generation_config.json"
_MAX_FILE_BYTES = 1 << 20  # a real generation_config.json is well under 4 KiB
_CHAT_TEMPLATE_FILES = ("chat_template.jinja", "chat_template.json")


@dataclass(frozen=True)
class SamplingDefaults:
    """What an unset sampling field becomes. `from_model`: the generation_config keys that set them."""

    temperature: float = 1.0  # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 = off
    repetition_penalty: float = 1.0
    max_new_tokens: int | None = None  # None: the server's --default-max-new-tokens
    from_model: tuple[str, ...] = ()


def _number(raw: dict[str, Any], key: str, ok: Any, as_int: bool = False) -> float | int | None:
    """raw[key] if it is a finite number of the right kind that passes `ok`, else None (warned)."""
    if key not in raw or raw[key] is None:
        return None
    value = raw[key]
    kind_ok = isinstance(value, int) if as_int else isinstance(value, (int, float))
    if isinstance(value, bool) or not kind_ok or not math.isfinite(float(value)) or not ok(value):
        log.warning("%s: ignoring %s=%r (out of range or not a number)", GENERATION_CONFIG, key, value)
        return None
    return int(value) if as_int else float(value)


def parse(raw: dict[str, Any]) -> SamplingDefaults:
    """The defaults a generation_config dict sets (keys it does not set keep the built-in value)."""
    found: list[str] = []
    out: dict[str, Any] = {}
    checks: tuple[tuple[str, Any, bool], ...] = (
        ("temperature", lambda v: v >= 0, False),
        ("top_p", lambda v: 0 < v <= 1, False),
        ("top_k", lambda v: v >= 0, True),
        ("repetition_penalty", lambda v: v > 0, False),
        ("max_new_tokens", lambda v: v >= 1, True),
    )
    for key, ok, as_int in checks:
        value = _number(raw, key, ok, as_int)
        if value is not None:
            out[key] = value
            found.append(key)
    # transformers' `do_sample: false` is greedy decoding, whatever temperature the file also gives.
    if raw.get("do_sample") is False:
        out["temperature"] = 0.0
        found.append("do_sample")
    return SamplingDefaults(**out, from_model=tuple(found))


def load_sampling_defaults(model_dir: Path | None) -> SamplingDefaults:
    """From MODEL_DIR/generation_config.json; the built-in defaults when there is none (or it is bad)."""
    if model_dir is None:
        return SamplingDefaults()
    path = Path(model_dir) / GENERATION_CONFIG
    try:
        if not path.is_file():
            return SamplingDefaults()
        if path.stat().st_size > _MAX_FILE_BYTES:
            log.warning("%s is over %d bytes: ignored", path, _MAX_FILE_BYTES)
            return SamplingDefaults()
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        log.warning("%s unreadable, using built-in sampling defaults: %s", path, err)
        return SamplingDefaults()
    if not isinstance(raw, dict):
        log.warning("%s is not a JSON object: ignored", path)
        return SamplingDefaults()
    return parse(raw)


def has_chat_template(model_dir: Path | None) -> bool:
    """The checkpoint ships a chat template (a template file, or `chat_template` in tokenizer_config)."""
    if model_dir is None:
        return False
    root = Path(model_dir)
    if any((root / name).is_file() for name in _CHAT_TEMPLATE_FILES):
        return True
    config = root / "tokenizer_config.json"
    try:
        if config.is_file() and config.stat().st_size <= 64 * _MAX_FILE_BYTES:
            raw = json.loads(config.read_text(encoding="utf-8"))
            return isinstance(raw, dict) and bool(raw.get("chat_template"))
    except (OSError, ValueError):
        pass
    return False
