"""An adapter root for tests: real PEFT adapters on the real base, plus broken and escaping variants.

Layout (all under ROOT unless noted):
  demo/1   LoRA r=8, no manifest (a plain PEFT folder)      demo/2   LoRA r=8, another seed, with a manifest
  rs/1     rsLoRA r=8, manifest with the real fingerprint  dora/1   DoRA r=8 (vLLM must refuse it)
  big/1    LoRA r=32 (over a --max-adapter-rank 16 server)  missing/1 demo/1 without its safetensors
  trunc/1  demo/1 with the safetensors cut short            wrongbase/1 demo/1 with a foreign base_fingerprint
  esc/1    -> symlink to OUTSIDE/lora (a folder outside the root)
  fsym/1   demo/1 whose safetensors is a symlink to a file outside the root
  wide/1   LoRA r=8 on every linear layer of the blocks    swap/1, swap/2 copies of demo/1, demo/2
  f1..f4/1 copies of demo/1 under other names (fillers for eviction tests)
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

from .adaptertools import make_adapter


@dataclass(frozen=True)
class AdapterRoot:
    root: Path
    outside: Path
    base: Path
    fingerprint: str


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def build_adapter_root(where: Path, base: Path, fingerprint: str) -> AdapterRoot:
    root, outside = where / "root", where / "outside"
    root.mkdir(parents=True)
    outside.mkdir()
    manifest = {
        "name": "",
        "version": "",
        "base_model": base.name,
        "base_fingerprint": fingerprint,
        "created_at": "2026-01-01T00:00:00+00:00",
        "dataset": {"kind": "random"},
        "note": "kept",
    }
    # scale 1.0: strong enough that greedy output leaves the base's within a few tokens
    make_adapter(base, root / "demo" / "1", method="lora", rank=8, seed=1, scale=1.0)
    make_adapter(
        base,
        root / "demo" / "2",
        method="lora",
        rank=8,
        seed=2,
        scale=1.0,
        manifest={**manifest, "name": "demo", "version": "2", "method": "lora", "tuning_method": "lora"},
    )
    make_adapter(
        base,
        root / "rs" / "1",
        method="rslora",
        rank=8,
        seed=3,
        scale=1.0,
        manifest={**manifest, "name": "rs", "version": "1", "method": "rslora", "tuning_method": "rslora"},
    )
    make_adapter(base, root / "dora" / "1", method="dora", rank=8, seed=4)
    make_adapter(base, root / "big" / "1", method="lora", rank=32, seed=5)
    make_adapter(
        base,
        root / "wide" / "1",
        method="lora",
        rank=8,
        seed=6,
        scale=0.5,
        targets=("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
    )

    demo = root / "demo" / "1"
    (_copy(demo, root / "missing" / "1") / "adapter_model.safetensors").unlink()
    trunc = _copy(demo, root / "trunc" / "1") / "adapter_model.safetensors"
    data = trunc.read_bytes()
    trunc.write_bytes(data[: len(data) - 1000])
    wrong = _copy(demo, root / "wrongbase" / "1")
    (wrong / "manifest.json").write_text(json.dumps({**manifest, "base_fingerprint": "0" * 64}))
    _copy(demo, outside / "lora")
    (root / "esc").mkdir()
    (root / "esc" / "1").symlink_to(outside / "lora", target_is_directory=True)
    fsym = _copy(demo, root / "fsym" / "1")
    (fsym / "adapter_model.safetensors").unlink()
    (fsym / "adapter_model.safetensors").symlink_to(outside / "lora" / "adapter_model.safetensors")
    _copy(demo, root / "swap" / "1")
    _copy(root / "demo" / "2", root / "swap" / "2")
    for i in range(1, 5):
        _copy(demo, root / f"f{i}" / "1")
    return AdapterRoot(root=root, outside=outside, base=base, fingerprint=fingerprint)
