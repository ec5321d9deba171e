"""Model resolution: the embedded default converts from its GGUF, local dirs resolve, bad specs say why."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from effllm.common import model


@pytest.mark.model
def test_default_converts_once_and_deterministically(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    shared = model.resolve_model(None)  # the cache every other test uses
    monkeypatch.setenv("EFFLLM_CACHE", str(tmp_path))
    fresh = model.resolve_model(None)
    assert fresh.path == tmp_path / "models" / model.DEFAULT_MODEL_NAME
    assert fresh.fingerprint == shared.fingerprint, "conversion must be byte-for-byte reproducible"
    config = json.loads((fresh.path / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"] and "quantization_config" not in config
    assert not [p for p in tmp_path.rglob(".SmolLM2*")], "no temp dir left behind"
    mtime = (fresh.path / "model.safetensors").stat().st_mtime_ns
    assert model.resolve_model(None).path == fresh.path
    assert (fresh.path / "model.safetensors").stat().st_mtime_ns == mtime, (
        "second resolve must not convert again"
    )


@pytest.mark.model
def test_local_dir_and_parameter_count() -> None:
    import torch
    from safetensors.torch import load_file

    default = model.resolve_model(None)
    local = model.resolve_model(str(default.path))
    assert local.path == default.path and local.fingerprint == default.fingerprint
    tensors = load_file(default.path / "model.safetensors")
    assert model.count_parameters(default.path) == sum(t.numel() for t in tensors.values())
    assert model.max_position_embeddings(default.path) == 8192
    del tensors, torch


def test_dir_without_config_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"config\.json"):
        model.resolve_model(str(tmp_path))


def test_unknown_hub_id_without_network_says_so() -> None:
    with pytest.raises(ValueError, match="neither a local directory nor a reachable hub id"):
        model.resolve_model("no-such-org/no-such-model-effllm")


def test_fingerprint_changes_with_weights(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "model.safetensors").write_bytes(b"a" * 10)
    first = model.fingerprint(tmp_path)
    (tmp_path / "model.safetensors").write_bytes(b"b" * 11)
    assert model.fingerprint(tmp_path) != first
