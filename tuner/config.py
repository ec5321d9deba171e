"""TuneConfig: the one typed schema of a tuning run; YAML files and CLI flags both map onto it.

Invariant: a TuneConfig that exists is valid (every field is checked in __post_init__, and the message names
the field). This module imports no torch, so the gRPC TuningService can validate a job before it spawns one.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

METHODS = ("lora", "lora_plus", "rslora", "dora", "freeze", "full")
LORA_FAMILY = ("lora", "lora_plus", "rslora", "dora")
SCHEDULES = ("constant", "cosine", "linear")
PRECISIONS = ("fp32", "bf16")
AUTOCASTS = ("auto", "bf16", "off")  # auto: bf16 where the CPU has BF16 instructions (or a CUDA GPU does)
# A hub dataset id as the hub spells them (huggingface_hub's validate_repo_id): NAME or OWNER/NAME, each part
# letters, digits, `_`, `-`, `.`, starting and ending with a letter, digit or `_`, no `--` or `..`, at most
# 96 characters; then an optional :SPLIT (a split name, maybe sliced: train[:10%]). Nothing path-like passes:
# no leading `/`, `.` or `~`, no backslash, no second `/`.
_HUB_PART = r"[A-Za-z0-9_](?:[A-Za-z0-9_.-]*[A-Za-z0-9_])?"
_HUB_SPEC = re.compile(rf"(?:{_HUB_PART}/)?{_HUB_PART}(?::[A-Za-z0-9_]{{1,64}}(?:\[[0-9%:+-]{{0,32}}\])?)?")
_HUB_MAX = 96
# The paper's PEFT setup targets all linear layers; these are their names in Llama-style models.
ALL_LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


class ConfigError(ValueError):
    """A config field is missing, unknown or out of range; the message names the field."""


@dataclass(frozen=True)
class TuneConfig:
    method: str = "lora"
    # Data: a JSONL path, "task:NAME" (built-in synthetic task) or "hf:ID[:SPLIT]" (a hub id, needs internet).
    data: str = "task:json_extract"
    eval_data: str = ""  # JSONL path or hf:ID; empty: a task's own split, or eval_fraction of the file
    eval_fraction: float = 0.1
    n_train: int = 256  # synthetic tasks: examples generated; files: 0 = all lines
    n_eval: int = 64  # held-out examples evaluated (loss and exact match)
    model: str = ""  # empty: the embedded default model (server/model.resolve_model)
    precision: str = "fp32"  # of the base weights; trainable LoRA weights follow it
    # LoRA family
    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    target_modules: tuple[str, ...] = ("q_proj", "v_proj")
    loraplus_lr_ratio: float = 16.0  # LoRA+: lr(B) = ratio * lr(A)
    # freeze: indices of the decoder layers that train (negative counts from the end); the rest stays frozen
    layers: tuple[int, ...] = (-2, -1)
    # optimisation
    lr: float = 2e-4
    weight_decay: float = 0.0
    schedule: str = "linear"
    warmup_steps: int = 0
    batch_size: int = 8
    grad_accum: int = 1
    epochs: int = 1
    max_steps: int = 0  # optimizer steps; > 0 overrides epochs
    max_length: int = 128  # tokens per example; longer ones are truncated (prompt kept, response cut)
    max_grad_norm: float = 1.0
    seed: int = 0
    # speed (tuner/speed.py); each is exact or switchable, so a run can be benchmarked with it on and off
    packing: bool = False  # lay a micro-batch's examples into shared rows (block-diagonal attention)
    pack_length: int = 0  # tokens per packed row; 0: 2 x max_length
    autocast: str = "auto"  # bf16 autocast of forward/backward; trainable weights stay fp32 (master)
    compile: bool = False  # torch.compile the training forward (its warm-up is reported separately)
    gradient_checkpointing: bool = False  # recompute activations in backward: less memory, more time
    logits_on_targets: bool = True  # lm_head only where a target token is predicted (exact, less work)
    eval_max_new_tokens: int = 48
    eval_before: bool = True  # also measure the held-out metrics of the untrained model
    output_dir: str = ""  # empty: runs/tune/<method>-<time>; must not exist yet

    def __post_init__(self) -> None:
        _check(self.method in METHODS, "method", f"{self.method!r} is not one of {', '.join(METHODS)}")
        _check(
            self.schedule in SCHEDULES, "schedule", f"{self.schedule!r} is not one of {', '.join(SCHEDULES)}"
        )
        _check(self.precision in PRECISIONS, "precision", f"{self.precision!r} is not one of {PRECISIONS}")
        _check(self.autocast in AUTOCASTS, "autocast", f"{self.autocast!r} is not one of {AUTOCASTS}")
        _check(
            self.pack_length == 0 or self.pack_length >= self.max_length,
            "pack_length",
            f"{self.pack_length} must be 0 or >= max_length {self.max_length} (an example must fit a row)",
        )
        _check(bool(self.data), "data", "is required (a JSONL path, task:NAME or hf:NAME)")
        for name in ("data", "eval_data"):
            value = getattr(self, name)
            if value.startswith("hf:"):
                check_hub_spec(name, value)
        _check(
            not self.eval_data.startswith("task:"),
            "eval_data",
            "a task:NAME brings its own held-out split; eval_data takes a JSONL path or hf:ID",
        )
        _check(0.0 <= self.eval_fraction < 1.0, "eval_fraction", f"{self.eval_fraction} is not in [0, 1)")
        for name in ("n_train", "n_eval", "warmup_steps", "max_steps", "eval_max_new_tokens", "pack_length"):
            _check(getattr(self, name) >= 0, name, f"{getattr(self, name)} must be >= 0")
        for name in ("rank", "batch_size", "grad_accum", "epochs"):
            _check(getattr(self, name) >= 1, name, f"{getattr(self, name)} must be >= 1")
        _check(8 <= self.max_length <= 32768, "max_length", f"{self.max_length} is not in 8..32768")
        for f in fields(self):  # inf passes every `> 0` below and trains to NaN; NaN fails them silently
            value = getattr(self, f.name)
            _check(not isinstance(value, float) or math.isfinite(value), f.name, f"{value} is not finite")
        _check(self.alpha > 0, "alpha", f"{self.alpha} must be > 0")
        _check(0.0 <= self.dropout < 1.0, "dropout", f"{self.dropout} is not in [0, 1)")
        _check(self.lr > 0, "lr", f"{self.lr} must be > 0")
        _check(self.weight_decay >= 0, "weight_decay", f"{self.weight_decay} must be >= 0")
        _check(self.loraplus_lr_ratio > 0, "loraplus_lr_ratio", f"{self.loraplus_lr_ratio} must be > 0")
        _check(
            self.max_grad_norm >= 0, "max_grad_norm", f"{self.max_grad_norm} must be >= 0 (0 = no clipping)"
        )
        _check(
            bool(self.target_modules) and all(isinstance(t, str) and t for t in self.target_modules),
            "target_modules",
            "needs at least one module name",
        )
        _check(
            bool(self.layers) and all(isinstance(i, int) for i in self.layers),
            "layers",
            "needs at least one integer layer index",
        )

    @property
    def is_lora_family(self) -> bool:
        return self.method in LORA_FAMILY

    @property
    def served_method(self) -> str:
        """How the server applies it: LoRA+ only changes training, the weights are plain LoRA."""
        return {"lora_plus": "lora"}.get(self.method, self.method)

    def replace(self, **changes: Any) -> TuneConfig:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return {f.name: list(v) if isinstance(v := getattr(self, f.name), tuple) else v for f in fields(self)}

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> TuneConfig:
        """Unknown keys and wrong types are errors naming the key (a typo must not silently use a default)."""
        known = {f.name: f for f in fields(cls)}
        values: dict[str, Any] = {}
        for key, value in raw.items():
            key = key.replace("-", "_")
            if key not in known:
                raise ConfigError(f"{key}: unknown setting (known: {', '.join(sorted(known))})")
            if value is None:
                continue
            values[key] = _coerce(key, known[key].default, value)
        return cls(**values)

    @classmethod
    def from_yaml(cls, path: str | Path, overrides: dict[str, Any] | None = None) -> TuneConfig:
        import yaml

        try:
            raw = yaml.safe_load(Path(path).read_text()) or {}
        except (OSError, yaml.YAMLError) as exc:
            raise ConfigError(f"config {path}: {exc}") from exc
        if not isinstance(raw, dict):
            raise ConfigError(f"config {path}: expected a mapping of settings, got {type(raw).__name__}")
        return cls.from_dict({**raw, **(overrides or {})})

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)


def check_hub_spec(name: str, value: str) -> None:
    """`value` ("hf:ID[:SPLIT]") names a hub dataset, not a path; the refusal never repeats the value, so it
    reads the same whether or not a like-named path exists (and no path is looked at)."""
    repo = value[3:].partition(":")[0]
    _check(
        bool(_HUB_SPEC.fullmatch(value[3:])) and len(repo) <= _HUB_MAX and not {"..", "--"} & _pairs(repo),
        name,
        "hf: takes a hub dataset id, NAME or OWNER/NAME (letters, digits, '_', '-', '.'; at most 96 "
        "characters) with an optional :SPLIT, never a path; local data is a JSONL path",
    )


def _pairs(text: str) -> set[str]:
    return {text[i : i + 2] for i in range(len(text) - 1)}


def _check(ok: bool, name: str, why: str) -> None:
    if not ok:
        raise ConfigError(f"{name}: {why}")


def _coerce(key: str, default: Any, value: Any) -> Any:
    try:
        if isinstance(default, bool):
            if isinstance(value, str):
                if value.lower() not in ("true", "false", "1", "0", "yes", "no"):
                    raise ValueError(value)
                return value.lower() in ("true", "1", "yes")
            return bool(value)
        if isinstance(default, tuple):
            items = value.split(",") if isinstance(value, str) else list(value)
            kind = type(default[0]) if default else str
            return tuple(kind(i.strip()) if isinstance(i, str) else kind(i) for i in items if i != "")
        if isinstance(default, int):
            if isinstance(value, float) and not value.is_integer():
                raise ValueError(value)
            return int(value)
        if isinstance(default, float):
            return float(value)
        return str(value)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{key}: {value!r} is not a valid {type(default).__name__}") from exc


def default_output_dir(config: TuneConfig) -> Path:
    import time

    return Path("runs") / "tune" / f"{config.method}-{time.strftime('%Y%m%d-%H%M%S')}"


__all__ = [
    "ALL_LINEAR",
    "AUTOCASTS",
    "LORA_FAMILY",
    "METHODS",
    "ConfigError",
    "TuneConfig",
    "check_hub_spec",
    "default_output_dir",
    "field",
]
