"""Write a finished run: the adapter (LoRA family) or checkpoint (freeze/full), manifest.json, metrics.json.

Invariant: the output directory appears whole or not at all. Everything is written into a hidden sibling
staging dir (`.NAME.staging-*`) and renamed into place in one os.rename; a run killed before the rename leaves
at most that hidden dir, which no reader (nor the server's adapter scan) treats as an output.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .train import RunResult

STAGING_MARK = ".staging-"


def check_output_dir(path: Path) -> None:
    """Refuse before training, not after: an existing output is never overwritten."""
    if path.exists():
        raise FileExistsError(f"output_dir: {path} already exists; choose a new directory")


def manifest(result: RunResult, name: str = "", version: str = "") -> dict[str, Any]:
    config = result.config
    m = result.metrics
    return {
        "name": name or Path(config.output_dir).name,
        "version": version,
        "method": config.served_method,
        "tuning_method": config.method,
        "rank": config.rank if config.is_lora_family else 0,
        "alpha": config.alpha if config.is_lora_family else 0.0,
        "target_modules": list(config.target_modules) if config.is_lora_family else [],
        "base_model": result.base_name,
        "base_fingerprint": result.base_fingerprint,
        "created_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "dataset": {
            "name": result.dataset.name,
            "sha256": result.dataset.sha256,
            "n_train": len(result.dataset.train),
            "n_eval": len(result.dataset.eval),
        },
        "hyperparameters": config.to_dict(),
        "metrics": {
            "trainable_params": m["params"]["trainable"],
            "train_loss_last": m["train_loss"][-1] if m["train_loss"] else None,
            "eval_before": _summary(m.get("eval_before")),
            "eval_after": _summary(m.get("eval_after")),
        },
    }


def _summary(ev: dict[str, Any] | None) -> dict[str, Any] | None:
    return None if ev is None else {"loss": ev["loss"], "exact_match": ev["exact_match"], "n": ev["n"]}


def save(result: RunResult, output_dir: Path, on_staging: Callable[[Path], None] | None = None) -> Path:
    """Write the run into `output_dir` atomically; returns it."""
    output_dir = output_dir.resolve()
    check_output_dir(output_dir)
    output_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{output_dir.name}{STAGING_MARK}", dir=output_dir.parent))
    if on_staging is not None:
        on_staging(staging)  # so a supervisor that kills us mid-write can remove it
    try:
        result.model.save_pretrained(staging, safe_serialization=True)
        if not result.config.is_lora_family:
            result.tokenizer.save_pretrained(staging)  # a checkpoint must load on its own
        record = manifest(result)
        if result.config.is_lora_family:
            # The server's own schema check: what it would refuse must fail here, before anything is visible.
            from effllm.common.manifest import Manifest

            Manifest.from_dict(record)
        (staging / "manifest.json").write_text(json.dumps(record, indent=2) + "\n")
        (staging / "metrics.json").write_text(json.dumps(result.metrics, indent=2) + "\n")
        staging.chmod(0o755)
        os.rename(staging, output_dir)  # atomic on one filesystem; fails if output_dir appeared meanwhile
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return output_dir
