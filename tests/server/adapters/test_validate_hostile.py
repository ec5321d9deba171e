"""Hostile adapter folders (issue 16, findings 2, 4, 5, 6): every one is refused with FAILED_PRECONDITION
(INVALID_ARGUMENT for a file resolving outside the root) naming the file and field, quickly, without
reading oversized files and without echoing what lies outside the root."""

from __future__ import annotations

import json
import os
import shutil
import struct
import time
from pathlib import Path

import pytest

from effllm.common.manifest import content_hash
from effllm.server.adapters.validate import BaseModules, Validated, validate
from effllm.server.engines.base import EffllmError

CONFIG, WEIGHTS, MANIFEST = "adapter_config.json", "adapter_model.safetensors", "manifest.json"


@pytest.fixture(scope="module")
def base(adapter_root) -> BaseModules:
    return BaseModules(adapter_root.base)


@pytest.fixture
def folder(adapter_root, tmp_path: Path) -> Path:
    return shutil.copytree(adapter_root.root / "demo" / "1", tmp_path / "root" / "x" / "1")


def _run(adapter_root, base, folder: Path, *, values: bool = True) -> Validated:
    root = folder.parent.parent
    return validate(
        folder,
        root,
        base,
        base_fingerprint=adapter_root.fingerprint,
        max_rank=64,
        methods=("lora", "rslora"),
        values=values,
    )


def _refused(adapter_root, base, folder: Path, code: str = "failed_precondition") -> str:
    with pytest.raises(EffllmError) as exc:
        _run(adapter_root, base, folder)
    assert exc.value.code == code, exc.value.message
    return exc.value.message


def _set_config(folder: Path, **changes: object) -> None:
    cfg = json.loads((folder / CONFIG).read_text())
    cfg.update(changes)
    (folder / CONFIG).write_text(json.dumps(cfg))


def _raw_config(folder: Path, key: str, literal: str) -> None:
    """Write `key` with a raw JSON literal (NaN, 1e400) that json.dumps would not produce."""
    cfg = json.loads((folder / CONFIG).read_text())
    cfg.pop(key, None)
    text = json.dumps(cfg)
    (folder / CONFIG).write_text(text[:-1] + f', "{key}": {literal}}}')


def test_good_adapter_has_a_content_hash(adapter_root, base, folder: Path) -> None:
    v = _run(adapter_root, base, folder)
    assert v.content_sha256 == content_hash(folder, folder.parent.parent) and len(v.content_sha256) == 64
    assert _run(adapter_root, base, folder, values=False).content_sha256 == ""


@pytest.mark.parametrize(
    ("key", "literal", "needle"),
    [
        ("lora_alpha", "NaN", "lora_alpha: is not a finite number"),
        ("lora_alpha", "-Infinity", "lora_alpha: is not a finite number"),
        ("r", "1e400", "r: is not a finite number"),
        ("r", "-4", "r: rank -4 must be >= 1"),
        ("r", "0", "r: rank 0 must be >= 1"),
        ("r", "100000000000000000000000", "rank: 100000000000000000000000 is over"),
        ("r", '"8"', "r: '8' is not an integer"),
        ("r", "true", "r: True is not an integer"),
        ("lora_alpha", "0", "lora_alpha: 0 is out of range"),
        ("lora_alpha", "1e300", "lora_alpha: 1e+300 is out of range"),
        ("lora_alpha", "[16]", "lora_alpha: [16] is not a number"),
        ("target_modules", "5", "target_modules: 5 is not a list"),
        ("target_modules", "[1, 2]", "target_modules: [1, 2] is not a list"),
        ("target_modules", '"("', "target_modules: '(' is not a valid regex"),
        ("target_modules", '"nothing_here.*"', "regex 'nothing_here.*' matches no module"),
        ("target_modules", json.dumps("q" * 2000), "target_modules: a regex of 1-1024 characters"),
        ("target_modules", '"(a|aa)*(b|model.*q_proj)"', ""),  # fine: matches, quickly
        ("rank_pattern", "[1, 2]", "rank_pattern: [1, 2] is not an object"),
        ("rank_pattern", '{"q_proj": 1e400}', "rank_pattern.q_proj: is not a finite number"),
        ("rank_pattern", '{"q_proj": 4096}', "rank: 4096 is over"),
        ("alpha_pattern", '{"q_proj": -1}', "alpha_pattern['q_proj']: -1 is out of range"),
        ("use_rslora", '"yes"', "use_rslora: 'yes' is not true or false"),
        ("peft_type", "7", "peft_type 7 is not LORA"),
        ("bias", "0", "bias: 0 is not a string"),
        ("deep", "[" * 100000 + "]" * 100000, "not valid JSON"),
        ("big_int", "9" * 5000, "not valid JSON"),
    ],
)
def test_bad_config_values_are_refused_naming_the_field(
    adapter_root, base, folder: Path, key: str, literal: str, needle: str
) -> None:
    _raw_config(folder, key, literal)
    if not needle:
        _run(adapter_root, base, folder)
        return
    message = _refused(adapter_root, base, folder)
    assert needle in message and message.startswith(("adapter_config.json", "rank", "target_modules"))


def test_catastrophic_regex_is_refused_in_bounded_time(adapter_root, base, folder: Path) -> None:
    _set_config(folder, target_modules="(.*a){30}.*q_proj")  # exponential backtracking on module names
    t0 = time.perf_counter()
    message = _refused(adapter_root, base, folder)
    assert "takes too long" in message or "matches no module" in message
    assert time.perf_counter() - t0 < 2.0


def _rss_kib() -> int:
    with open("/proc/self/status") as fh:
        return next(int(line.split()[1]) for line in fh if line.startswith("VmRSS"))


@pytest.mark.parametrize("name", [CONFIG, MANIFEST])
def test_two_gb_sparse_json_is_refused_fast_without_reading_it(
    adapter_root, base, folder: Path, name: str
) -> None:
    with (folder / name).open("wb") as fh:
        fh.write(b'{"r": 8, "pad": "')
        fh.truncate(2 << 30)  # sparse: 2 GiB that cost no disk
    rss = _rss_kib()
    t0 = time.perf_counter()
    message = _refused(adapter_root, base, folder)
    elapsed = time.perf_counter() - t0
    assert message.startswith(name) and "over the 1048576-byte limit" in message
    assert elapsed < 0.1, elapsed
    assert _rss_kib() - rss < 16 << 10  # KiB: nothing near the file's size was read


def test_config_fifo_is_not_read(adapter_root, base, folder: Path) -> None:
    (folder / MANIFEST).unlink(missing_ok=True)
    os.mkfifo(folder / MANIFEST)  # opening a FIFO for reading would block forever
    assert "not a regular file" in _refused(adapter_root, base, folder)


def test_manifest_symlink_out_of_the_root_is_refused_without_its_content(
    adapter_root, base, folder: Path, tmp_path: Path
) -> None:
    secret = tmp_path / "outside-secret.json"
    secret.write_text(json.dumps({"method": "SECRET-token-123"}))
    (folder / MANIFEST).symlink_to(secret)
    message = _refused(adapter_root, base, folder, code="invalid_argument")
    assert "manifest.json" in message and "outside the adapter root" in message
    assert "SECRET" not in message
    # a link to a VALID outside manifest does not load either
    secret.write_text(json.dumps({"method": "lora"}))
    assert "outside the adapter root" in _refused(adapter_root, base, folder, code="invalid_argument")


@pytest.mark.parametrize(
    ("manifest", "needle"),
    [
        ('{"alpha": NaN}', "alpha: is not a finite number"),
        ('{"metrics": {"loss": Infinity}}', "metrics.loss: is not a finite number"),
        ('{"rank": 100000000}', "rank: 100000000 is out of range"),
        ('{"rank": "8"}', "rank: '8' is not an integer"),
        ('{"target_modules": 5}', "target_modules: must be a list"),
        ('{"content_sha256": "zz"}', "content_sha256: is not 64"),
        ("[1, 2]", "must be a JSON object"),
    ],
)
def test_bad_manifest_values(adapter_root, base, folder: Path, manifest: str, needle: str) -> None:
    (folder / MANIFEST).write_text(manifest)
    message = _refused(adapter_root, base, folder)
    assert message.startswith("manifest.json") and needle in message, message


def test_manifest_content_hash_must_match_the_files(adapter_root, base, folder: Path) -> None:
    (folder / MANIFEST).write_text(json.dumps({"content_sha256": content_hash(folder)}))
    _run(adapter_root, base, folder)
    (folder / MANIFEST).write_text(json.dumps({"content_sha256": "0" * 64}))
    assert "does not match the adapter's files" in _refused(adapter_root, base, folder)


def _rewrite_header(path: Path, edit) -> None:
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])
    edit(header)
    text = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(text)) + text + raw[8 + n :])


@pytest.mark.parametrize(
    ("field", "value", "needle"),
    [
        ("data_offsets", "ab", "data_offsets 'ab' is not [start, end]"),
        ("data_offsets", [0], "data_offsets [0] is not [start, end]"),
        ("data_offsets", [-1, 4], "data_offsets [-1, 4]"),
        ("shape", "ab", "shape 'ab' is not a list"),
        ("shape", [1e400], "shape"),
        ("shape", [True, 8], "shape [True, 8]"),
        ("dtype", "F128", "dtype 'F128' is not a safetensors dtype"),
        ("dtype", 5, "dtype 5"),
    ],
)
def test_malformed_safetensors_entries(adapter_root, base, folder: Path, field, value, needle) -> None:
    def edit(header: dict) -> None:
        key = next(k for k in header if k != "__metadata__")
        header[key][field] = value

    _rewrite_header(folder / WEIGHTS, edit)
    message = _refused(adapter_root, base, folder)
    assert message.startswith(WEIGHTS) and needle in message, message


def test_truncated_and_overlapping_weights(adapter_root, base, folder: Path) -> None:
    st = folder / WEIGHTS
    good = st.read_bytes()
    st.write_bytes(good[:-3])
    assert "truncated" in _refused(adapter_root, base, folder)

    def overlap(header: dict) -> None:  # two tensors over the same bytes: sizes add up, layout does not
        keys = sorted((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"])
        a, b = header[keys[0]], header[keys[1]]
        if a["data_offsets"][1] - a["data_offsets"][0] == b["data_offsets"][1] - b["data_offsets"][0]:
            b["data_offsets"] = list(a["data_offsets"])

    st.write_bytes(good)
    _rewrite_header(st, overlap)
    message = _refused(adapter_root, base, folder)
    assert message.startswith(WEIGHTS)


@pytest.mark.parametrize(
    ("dtype", "bad"), [("float32", float("nan")), ("float32", float("inf")), ("bfloat16", float("nan"))]
)
def test_non_finite_weights_are_refused_on_the_values_pass(
    adapter_root, base, folder: Path, dtype: str, bad: float
) -> None:
    import torch
    from safetensors.torch import load_file, save_file

    tensors = load_file(folder / WEIGHTS)
    key = sorted(tensors)[-1]
    tensors = {k: v.to(getattr(torch, dtype)) for k, v in tensors.items()}
    tensors[key].view(-1)[-1] = bad  # the very last element of one tensor
    save_file(tensors, folder / WEIGHTS, metadata={"format": "pt"})
    _run(adapter_root, base, folder, values=False)  # the structural pass does not read values
    message = _refused(adapter_root, base, folder)
    assert message.startswith(WEIGHTS) and "NaN or inf" in message and key in message


def test_config_link_inside_the_root_is_followed_but_not_out(adapter_root, base, folder: Path) -> None:
    real = folder.parent / "config-real.json"
    shutil.move(folder / CONFIG, real)
    (folder / CONFIG).symlink_to(real)  # inside the root: fine
    _run(adapter_root, base, folder)
