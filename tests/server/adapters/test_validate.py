from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from effllm.server.adapters.validate import BaseModules, read_safetensors_header, validate
from effllm.server.engines.base import EffllmError

VLLM = ("lora", "rslora")


@pytest.fixture(scope="module")
def base(adapter_root) -> BaseModules:
    return BaseModules(adapter_root.base)


def _check(
    adapter_root, base: BaseModules, rel: str, *, max_rank: int = 64, methods=VLLM, root: Path | None = None
):
    root = root or adapter_root.root
    return validate(
        root / rel, root, base, base_fingerprint=adapter_root.fingerprint, max_rank=max_rank, methods=methods
    )


def _refused(adapter_root, base, rel: str, **kw) -> EffllmError:
    with pytest.raises(EffllmError) as exc:
        _check(adapter_root, base, rel, **kw)
    return exc.value


def test_base_modules_from_headers(base: BaseModules) -> None:
    assert base.shapes["model.layers.0.self_attn.q_proj"] == (576, 576)
    assert base.shapes["model.layers.29.self_attn.v_proj"] == (192, 576)  # GQA: 3 KV heads of 64
    assert base.shapes["lm_head"] == base.shapes["model.embed_tokens"]  # tied embeddings
    assert base.matches("q_proj") and base.matches("mlp.down_proj") and not base.matches("c_attn")


def test_plain_peft_lora_and_rslora(adapter_root, base) -> None:
    v = _check(adapter_root, base, "demo/1")
    assert (v.method, v.rank, v.alpha, v.manifest) == ("lora", 8, 16.0, None)
    assert set(v.target_modules) == {"q_proj", "v_proj"} and v.weight_bytes > 0
    v = _check(adapter_root, base, "rs/1")
    assert (
        v.method == "rslora"
        and v.manifest is not None
        and v.manifest.base_fingerprint == adapter_root.fingerprint
    )
    assert v.manifest.extra == {"note": "kept"}


def test_dora_refused_by_an_engine_without_it_and_accepted_by_one_with_it(adapter_root, base) -> None:
    err = _refused(adapter_root, base, "dora/1")
    assert err.code == "failed_precondition" and "dora" in err.message and "lora, rslora" in err.message
    v = _check(adapter_root, base, "dora/1", methods=("lora", "rslora", "dora"))
    assert v.method == "dora"


def test_each_broken_adapter_names_its_reason(adapter_root, base) -> None:
    cases = {
        "missing/1": "adapter_model.safetensors: missing",
        "trunc/1": "truncated",
        "wrongbase/1": "base_fingerprint",
        "big/1": "rank: 32 is over this server's max adapter rank 16",
    }
    for rel, needle in cases.items():
        err = _refused(adapter_root, base, rel, max_rank=16)
        assert err.code == "failed_precondition", rel
        assert needle in err.message, (rel, err.message)
    err = _refused(adapter_root, base, "fsym/1")
    assert err.code == "invalid_argument" and "outside the adapter root" in err.message


def test_shape_and_target_mismatch(adapter_root, base, tmp_path: Path) -> None:
    root = tmp_path / "root"
    shutil.copytree(adapter_root.root / "demo" / "1", root / "x" / "1")
    cfg_path = root / "x" / "1" / "adapter_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg_path.write_text(json.dumps({**cfg, "target_modules": ["q_proj", "c_attn"]}))
    err = _refused(adapter_root, base, "x/1", root=root)
    assert "c_attn" in err.message and err.message.startswith("target_modules")
    cfg_path.write_text(json.dumps({**cfg, "peft_type": "IA3"}))
    assert "peft_type" in _refused(adapter_root, base, "x/1", root=root).message

    # A LoRA made for another architecture: shapes that do not fit this base.
    cfg_path.write_text(json.dumps(cfg))
    st = root / "x" / "1" / "adapter_model.safetensors"
    header = read_safetensors_header(st)
    key = next(k for k in header if k.endswith("q_proj.lora_B.weight"))
    raw = st.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    text = raw[8 : 8 + n].decode()
    bad = text.replace(
        f'"{key}":{{"dtype":"F32","shape":[576,8]', f'"{key}":{{"dtype":"F32","shape":[288,16]'
    )
    assert bad != text
    st.write_bytes(len(bad).to_bytes(8, "little") + bad.encode() + raw[8 + n :])
    err = _refused(adapter_root, base, "x/1", root=root)
    assert "q_proj" in err.message and "[288, 16]" in err.message


def test_garbage_and_tiny_files(adapter_root, base, tmp_path: Path) -> None:
    root = tmp_path / "root"
    folder = shutil.copytree(adapter_root.root / "demo" / "1", root / "x" / "1")
    st = folder / "adapter_model.safetensors"
    for blob, needle in [
        (b"\x01\x02", "too short"),
        (b"\xff" * 64, "header claims"),
        ((10).to_bytes(8, "little") + b"not json!!", "not valid JSON"),
    ]:
        st.write_bytes(blob)
        assert needle in _refused(adapter_root, base, "x/1", root=root).message
    (folder / "adapter_config.json").write_text("[")
    assert "unreadable" in _refused(adapter_root, base, "x/1", root=root).message
    (folder / "adapter_config.json").unlink()
    assert "adapter_config.json: missing" in _refused(adapter_root, base, "x/1", root=root).message


def test_manifest_method_must_agree_with_config(adapter_root, base, tmp_path: Path) -> None:
    root = tmp_path / "root"
    folder = shutil.copytree(adapter_root.root / "rs" / "1", root / "x" / "1")
    m = json.loads((folder / "manifest.json").read_text())
    (folder / "manifest.json").write_text(json.dumps({**m, "method": "lora"}))
    assert "disagrees" in _refused(adapter_root, base, "x/1", root=root).message
