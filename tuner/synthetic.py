"""Synthetic PEFT adapters on a real base (LoRA, rsLoRA, DoRA): random A and B, no training, in seconds.

For benchmarks, GPU checks and tests that need real adapter files to serve: B is non-zero, so each adapter
changes the model's output, and different seeds give different adapters. Not for quality: a synthetic
adapter only makes greedy output differ from the base within a few tokens.
Invariant: the output folder is what `save_pretrained` writes (plus manifest.json when given), nothing else.
"""

from __future__ import annotations

import json
from pathlib import Path

DEFAULT_TARGETS = ("q_proj", "v_proj")


def make_adapter(
    base_path: Path,
    out_dir: Path,
    *,
    method: str = "lora",
    rank: int = 8,
    alpha: int | None = None,  # PEFT's lora_alpha is an int; None: 2 * rank
    seed: int = 0,
    targets: tuple[str, ...] = DEFAULT_TARGETS,
    scale: float = 0.5,
    manifest: dict[str, object] | None = None,
) -> Path:
    """Save a PEFT adapter for `base_path` into `out_dir` and return it. `scale` sets the size of the random
    weights: large enough that greedy output differs from the base within a few tokens."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    base = AutoModelForCausalLM.from_pretrained(base_path, dtype=torch.float32)
    config = LoraConfig(
        r=rank,
        lora_alpha=alpha if alpha is not None else 2 * rank,
        target_modules=list(targets),
        lora_dropout=0.0,
        use_rslora=method == "rslora",
        use_dora=method == "dora",
        init_lora_weights=False,  # random A and B: the adapter really changes the output
        task_type="CAUSAL_LM",
    )
    model = get_peft_model(base, config)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_" in name:
                param.mul_(scale)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out_dir))
    if manifest is not None:
        (out_dir / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return out_dir


def clone_adapter(template: Path, out_dir: Path, *, seed: int) -> Path:
    """A copy of `template` (same config) with fresh random weights of the same size per tensor: a distinct
    adapter in milliseconds, without loading the base model again."""
    import shutil

    import torch
    from safetensors.torch import load_file, save_file

    out_dir.mkdir(parents=True, exist_ok=True)
    shutil.copy(template / "adapter_config.json", out_dir / "adapter_config.json")
    g = torch.Generator().manual_seed(seed)
    weights = load_file(template / "adapter_model.safetensors")
    fresh = {k: torch.randn(v.shape, generator=g) * v.std() for k, v in weights.items()}
    save_file(fresh, out_dir / "adapter_model.safetensors", metadata={"format": "pt"})
    return out_dir


def make_many_adapters(
    base_path: Path, root: Path, count: int, *, scale: float = 1.0
) -> list[tuple[str, str, int]]:
    """ROOT/m{i}/1 for i < count, cycling through LoRA r8, rsLoRA r16, LoRA r16, rsLoRA r8 (one PEFT
    template each, then clones). Returns (name, method, rank) per adapter."""
    kinds = [("lora", 8), ("rslora", 16), ("lora", 16), ("rslora", 8)]
    templates = {
        kind: make_adapter(
            base_path,
            root.parent / f"{root.name}-templates" / f"{kind[0]}{kind[1]}",
            method=kind[0],
            rank=kind[1],
            seed=kind[1],
            scale=scale,
        )
        for kind in kinds[: min(count, len(kinds))]
    }
    out = []
    for i in range(count):
        method, rank = kinds[i % len(kinds)]
        clone_adapter(templates[(method, rank)], root / f"m{i}" / "1", seed=1000 + i)
        out.append((f"m{i}", method, rank))
    return out
