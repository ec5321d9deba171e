"""Hypothesis fuzz of adapter folders against the validation layer, in process: >= 2,000 folders per run
with random config and manifest fields (types, values, sizes), and weights that are good, truncated,
mangled or hold NaN/inf. Whatever the folder holds, `validate` returns or raises an EffllmError with
code failed_precondition / invalid_argument / not_found — never anything else."""

from __future__ import annotations

import json
import math
import struct
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from effllm.server.adapters.validate import BaseModules, validate
from effllm.server.engines.base import EffllmError

ALLOWED = {"failed_precondition", "invalid_argument", "not_found"}
MODULE = "base_model.model.model.layers.0.self_attn.q_proj"
HIDDEN = 576  # SmolLM2-135M q_proj is [576, 576]
EXAMPLES = 2100

json_leaf = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**70), 2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=12),
    st.sampled_from(["q_proj", "(", ".*", "LORA", "lora", "none", "(a+)+$", "x" * 2000]),
)
json_value = st.recursive(
    json_leaf,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=8,
)
CONFIG_KEYS = [
    "r",
    "lora_alpha",
    "target_modules",
    "rank_pattern",
    "alpha_pattern",
    "use_rslora",
    "use_dora",
    "peft_type",
    "bias",
    "modules_to_save",
]
MANIFEST_KEYS = ["name", "version", "method", "rank", "alpha", "target_modules", "base_fingerprint",
                 "created_at", "metrics", "content_sha256", "tuning_method"]  # fmt: skip


def weights_bytes(rank: int, dtype: str = "F32") -> bytes:
    """A safetensors file with one LoRA pair on layer 0's q_proj (A [r, 576], B [576, r]), no torch."""
    item = {"F32": 4, "F16": 2, "BF16": 2}[dtype]
    a = rank * HIDDEN * item
    header = {
        f"{MODULE}.lora_A.weight": {"dtype": dtype, "shape": [rank, HIDDEN], "data_offsets": [0, a]},
        f"{MODULE}.lora_B.weight": {"dtype": dtype, "shape": [HIDDEN, rank], "data_offsets": [a, 2 * a]},
    }
    text = json.dumps(header).encode()
    data = (np.random.default_rng(rank).standard_normal(2 * a // item) * 0.01).astype(np.float32)
    raw = data.tobytes() if dtype == "F32" else (data.view(np.uint32) >> 16).astype(np.uint16).tobytes()
    if dtype == "F16":
        raw = data.astype(np.float16).tobytes()
    return struct.pack("<Q", len(text)) + text + raw


GOOD_CONFIG = {"peft_type": "LORA", "r": 2, "lora_alpha": 4, "target_modules": ["q_proj"], "bias": "none"}


@st.composite
def folders(draw: st.DrawFn) -> dict[str, object]:
    config = dict(GOOD_CONFIG)
    for key in draw(st.lists(st.sampled_from(CONFIG_KEYS), max_size=3, unique=True)):
        if draw(st.booleans()):
            config[key] = draw(json_value)
        else:
            config.pop(key, None)
    dtype = draw(st.sampled_from(["F32", "F16", "BF16"]))
    weights = bytearray(weights_bytes(2, dtype))
    how = draw(st.sampled_from(["good", "good", "truncate", "nonfinite", "flip", "header"]))
    if how == "truncate":
        del weights[draw(st.integers(0, len(weights) - 1)) :]
    elif how == "nonfinite":
        (n,) = struct.unpack("<Q", weights[:8])
        item = 4 if dtype == "F32" else 2
        at = 8 + n + item * draw(st.integers(0, (len(weights) - 8 - n) // item - 1))
        bits = {"F32": b"\x00\x00\xc0\x7f", "F16": b"\x00\x7e", "BF16": b"\xc0\x7f"}[dtype]
        if draw(st.booleans()):  # +inf instead of NaN
            bits = {"F32": b"\x00\x00\x80\x7f", "F16": b"\x00\x7c", "BF16": b"\x80\x7f"}[dtype]
        weights[at : at + item] = bits
    elif how == "flip":
        at = draw(st.integers(0, len(weights) - 1))
        weights[at] = draw(st.integers(0, 255))
    elif how == "header":
        (n,) = struct.unpack("<Q", weights[:8])
        header = json.loads(weights[8 : 8 + n])
        entry = header[draw(st.sampled_from(sorted(header)))]
        entry[draw(st.sampled_from(["dtype", "shape", "data_offsets"]))] = draw(json_value)
        text = json.dumps(header).encode()
        weights = bytearray(struct.pack("<Q", len(text)) + text + weights[8 + n :])
    manifest: object = None
    if draw(st.booleans()):
        manifest = {k: draw(json_value) for k in draw(st.lists(st.sampled_from(MANIFEST_KEYS), max_size=3))}
        if draw(st.integers(0, 9)) == 0:
            manifest = draw(json_value)
    oversize = draw(st.sampled_from([None, None, None, None, None, None, "config", "manifest"]))
    return {"config": config, "weights": bytes(weights), "manifest": manifest, "oversize": oversize}


@pytest.fixture(scope="module")
def base(adapter_root) -> BaseModules:
    return BaseModules(adapter_root.base)


def _write(folder: Path, case: dict[str, object]) -> None:
    (folder / "adapter_config.json").write_text(json.dumps(case["config"]))  # NaN/inf as JSON NaN/Infinity
    (folder / "adapter_model.safetensors").write_bytes(case["weights"])  # type: ignore[arg-type]
    manifest = folder / "manifest.json"
    if case["manifest"] is None:
        manifest.unlink(missing_ok=True)
    else:
        manifest.write_text(json.dumps(case["manifest"]))
    if case["oversize"]:
        name = "adapter_config.json" if case["oversize"] == "config" else "manifest.json"
        with (folder / name).open("ab") as fh:
            fh.truncate((1 << 20) + 1)


def test_fuzz_adapter_folders_only_ever_give_clear_refusals(adapter_root, base, tmp_path: Path) -> None:
    root = tmp_path / "root"
    folder = root / "x" / "1"
    folder.mkdir(parents=True)
    outcomes: Counter[str] = Counter()
    _write(folder, {"config": GOOD_CONFIG, "weights": weights_bytes(2), "manifest": None, "oversize": None})
    validate(folder, root, base, base_fingerprint=adapter_root.fingerprint, max_rank=16,
             methods=("lora", "rslora"), values=True)  # fmt: skip  # the baseline folder is valid

    @settings(
        max_examples=EXAMPLES,
        deadline=None,
        database=None,
        suppress_health_check=[
            HealthCheck.too_slow,
            HealthCheck.data_too_large,
            HealthCheck.large_base_example,
        ],
    )
    @given(case=folders())
    def run(case: dict[str, object]) -> None:
        _write(folder, case)
        try:
            v = validate(
                folder,
                root,
                base,
                base_fingerprint=adapter_root.fingerprint,
                max_rank=16,
                methods=("lora", "rslora"),
                values=True,
            )
        except EffllmError as err:
            assert err.code in ALLOWED, (err.code, err.message)
            outcomes[err.code] += 1
            return
        # accepted: then it really is loadable-looking — finite, in range, the right weights
        assert 1 <= v.rank <= 16 and math.isfinite(v.alpha) and v.alpha > 0 and len(v.content_sha256) == 64
        outcomes["ok"] += 1

    run()
    print(f"adapter folder fuzz: {dict(outcomes)}")
    assert sum(outcomes.values()) >= 2000
    assert outcomes["ok"] >= 100 and outcomes["failed_precondition"] >= 500  # both paths exercised
