"""Adapters that cannot poison the engine, end to end (issue 16 findings 2, 4, 5, 6; issue 12 identity).

On the session's hardened vLLM server (TLS, admin token, adapter root with good/1): hostile folders are
refused with FAILED_PRECONDITION (INVALID_ARGUMENT for links out of the root), never UNKNOWN/INTERNAL, and
greedy base output is byte-identical before and after every attempt; a 50-folder hypothesis fuzz goes
through LoadAdapter. Identity and churn run on the session's adapter server in test_adapters_e2e
(prefix caching is on by default in vLLM)."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import grpc
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from effllm.client import EffllmClient

from .conftest import Hardened

pytestmark = pytest.mark.timeout(1800)

ALLOWED = {"FAILED_PRECONDITION", "INVALID_ARGUMENT", "NOT_FOUND"}
PROMPT = "The capital of France is"


@pytest.fixture(scope="module")
def admin(hardened: Hardened):
    client = EffllmClient(hardened.server.target, security=hardened.security("admin"), timeout=300)
    yield client
    client.close()


def _base(client: EffllmClient) -> tuple[str, list[int]]:
    reply = client.generate(PROMPT, max_new_tokens=8, temperature=0.0)
    return reply.text, list(reply.token_ids)


def _code(fn, *args, **kw) -> tuple[str, str]:
    with pytest.raises(grpc.RpcError) as exc:
        fn(*args, **kw)
    return exc.value.code().name, exc.value.details()


def _copy_good(hardened: Hardened, name: str) -> Path:
    assert hardened.adapter_root is not None
    dest = hardened.adapter_root / name / "1"
    shutil.rmtree(dest.parent, ignore_errors=True)
    return shutil.copytree(hardened.adapter_root / "good" / "1", dest)


def _edit_config(folder: Path, raw: str) -> None:
    text = (folder / "adapter_config.json").read_text().rstrip()
    (folder / "adapter_config.json").write_text(text[:-1] + ", " + raw + "}")


def test_nan_adapter_is_refused_and_base_output_is_unchanged(hardened: Hardened, admin) -> None:
    before = _base(admin)
    nan_alpha = _copy_good(hardened, "nanalpha")
    cfg = json.loads((nan_alpha / "adapter_config.json").read_text())
    cfg.pop("lora_alpha")
    (nan_alpha / "adapter_config.json").write_text(json.dumps(cfg)[:-1] + ', "lora_alpha": NaN}')
    code, details = _code(admin.load_adapter, "nanalpha", "1")
    assert code == "FAILED_PRECONDITION" and "lora_alpha" in details

    import torch
    from safetensors.torch import load_file, save_file

    nan_w = _copy_good(hardened, "nanweights")
    tensors = load_file(nan_w / "adapter_model.safetensors")
    key = sorted(tensors)[0]
    tensors[key].view(-1)[7] = float("nan")
    save_file(tensors, nan_w / "adapter_model.safetensors")
    code, details = _code(admin.load_adapter, "nanweights", "1")
    assert (
        code == "FAILED_PRECONDITION" and "NaN or inf" in details and "adapter_model.safetensors" in details
    )
    assert not any(a.name.startswith("nan") for a in admin.list_adapters())
    assert _base(admin) == before  # byte-identical greedy base output
    del torch


def test_vllm_probe_refuses_finite_weights_whose_logits_overflow(hardened: Hardened, admin) -> None:
    """Weights every scan passes (finite, 1e30) whose product overflows fp32: only the probe can see it.
    On the eager vLLM engine core on CPU (the default) the probe reads logprobs, so it refuses them."""
    from safetensors.torch import load_file, save_file

    before = _base(admin)
    huge = _copy_good(hardened, "overflow")
    tensors = load_file(huge / "adapter_model.safetensors")
    save_file({k: v.fill_(1e30) for k, v in tensors.items()}, huge / "adapter_model.safetensors")
    code, details = _code(admin.load_adapter, "overflow", "1")
    assert code == "FAILED_PRECONDITION" and "not finite" in details, details
    assert not any(a.name == "overflow" for a in admin.list_adapters())
    assert _base(admin) == before


@pytest.mark.parametrize(
    ("raw", "needle"),
    [
        ('"target_modules": 5', "target_modules"),
        ('"target_modules": "("', "target_modules"),
        ('"rank_pattern": [1, 2]', "rank_pattern"),
        ('"r": 1e400', "r: is not a finite number"),
    ],
)
def test_malformed_configs_get_failed_precondition(hardened: Hardened, admin, raw: str, needle: str) -> None:
    folder = _copy_good(hardened, "malformed")
    cfg = json.loads((folder / "adapter_config.json").read_text())
    for key in ("target_modules", "rank_pattern", "r"):
        if raw.startswith(f'"{key}"'):
            cfg.pop(key, None)
    (folder / "adapter_config.json").write_text(json.dumps(cfg))
    _edit_config(folder, raw)
    code, details = _code(admin.load_adapter, "malformed", "1")
    assert code == "FAILED_PRECONDITION" and needle in details, details


def test_manifest_symlink_out_of_root_and_huge_config(hardened: Hardened, admin, tmp_path: Path) -> None:
    before = _base(admin)
    folder = _copy_good(hardened, "leak")
    secret = tmp_path / "secret.json"
    secret.write_text(json.dumps({"method": "SECRET-abc123"}))
    (folder / "manifest.json").symlink_to(secret)
    code, details = _code(admin.load_adapter, "leak", "1")
    assert code == "INVALID_ARGUMENT" and "manifest.json" in details and "SECRET" not in details
    (folder / "manifest.json").unlink()
    with (folder / "adapter_config.json").open("ab") as fh:
        fh.truncate(2 << 30)  # 2 GiB sparse
    t0 = time.perf_counter()
    code, details = _code(admin.load_adapter, "leak", "1")
    assert code == "FAILED_PRECONDITION" and "byte limit" in details
    assert time.perf_counter() - t0 < 5.0  # a round trip on a busy box; the check itself is ~1 ms
    (folder / "adapter_config.json").unlink()
    assert _base(admin) == before


def test_fuzz_load_adapter_through_the_server(hardened: Hardened, admin) -> None:
    """50 hostile folders through LoadAdapter: never UNKNOWN/INTERNAL, server healthy, base unchanged."""
    before = _base(admin)
    good = hardened.adapter_root / "good" / "1"  # type: ignore[operator]
    config = json.loads((good / "adapter_config.json").read_text())
    weights = (good / "adapter_model.safetensors").read_bytes()
    leaf = st.one_of(
        st.none(), st.booleans(), st.integers(-(2**66), 2**66), st.floats(), st.text(max_size=8),
        st.sampled_from(["q_proj", "(", ".*", "LORA", "x" * 3000]),
    )  # fmt: skip
    value = st.recursive(
        leaf,
        lambda s: st.one_of(st.lists(s, max_size=3), st.dictionaries(st.text(max_size=6), s, max_size=3)),
        max_leaves=6,
    )
    keys = st.sampled_from(["r", "lora_alpha", "target_modules", "rank_pattern", "use_rslora", "peft_type"])
    seen: dict[str, int] = {}

    @settings(max_examples=50, deadline=None, database=None, suppress_health_check=list(HealthCheck))
    @given(
        changes=st.dictionaries(keys, value, max_size=3),
        cut=st.one_of(st.none(), st.integers(0, len(weights) - 1)),
        nan_at=st.one_of(st.none(), st.integers(0, (len(weights) - 4) // 4)),
        manifest=st.one_of(st.none(), st.dictionaries(st.sampled_from(["rank", "alpha", "method"]), value)),
    )
    def run(changes, cut, nan_at, manifest) -> None:
        folder = _copy_good(hardened, "fz")
        (folder / "adapter_config.json").write_text(json.dumps({**config, **changes}))
        data = bytearray(weights if cut is None else weights[:cut])
        if nan_at is not None and cut is None:
            at = len(data) - 4 * (nan_at % 1000 + 1)  # in the data section, at the end of the file
            data[at : at + 4] = b"\x00\x00\xc0\x7f"
        (folder / "adapter_model.safetensors").write_bytes(bytes(data))
        if manifest is not None:
            (folder / "manifest.json").write_text(json.dumps(manifest))
        try:
            admin.load_adapter("fz", "1")
            seen["OK"] = seen.get("OK", 0) + 1
            admin.unload_adapter("fz", "1")
        except grpc.RpcError as err:
            assert err.code().name in ALLOWED, f"{err.code().name}: {err.details()}"
            seen[err.code().name] = seen.get(err.code().name, 0) + 1

    run()
    print(f"LoadAdapter fuzz: {seen}")
    assert sum(seen.values()) >= 50
    assert admin.health() == "SERVING"
    assert _base(admin) == before
