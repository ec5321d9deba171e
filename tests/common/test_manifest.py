from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path

import pytest

from effllm.common.manifest import Manifest, next_version, publish, read_manifest, write_manifest


def test_round_trip_keeps_unknown_keys(tmp_path: Path) -> None:
    data = {
        "name": "demo",
        "version": "3",
        "method": "rslora",
        "tuning_method": "lora_plus",
        "rank": 16,
        "alpha": 32,
        "target_modules": ["q_proj", "v_proj"],
        "base_model": "SmolLM2",
        "base_fingerprint": "ab" * 32,
        "created_at": "2026-11-28T05:00:00Z",
        "dataset": {"name": "synthetic"},
        "hyperparameters": {"lr": 1e-4},
        "metrics": {"loss": 1.5},
        "future_key": [1, 2],
    }
    (tmp_path / "manifest.json").write_text(json.dumps(data))
    m = read_manifest(tmp_path)
    assert m is not None
    assert (
        m.method == "rslora" and m.rank == 16 and m.alpha == 32.0 and m.target_modules == ("q_proj", "v_proj")
    )
    assert m.extra == {"future_key": [1, 2]}
    write_manifest(tmp_path, m)
    assert json.loads((tmp_path / "manifest.json").read_text()) == {**data, "alpha": 32.0}


def test_missing_optional_keys_and_no_manifest(tmp_path: Path) -> None:
    assert read_manifest(tmp_path) is None
    (tmp_path / "manifest.json").write_text("{}")
    assert read_manifest(tmp_path) == Manifest()


@pytest.mark.parametrize(
    "bad",
    [
        {"method": "ia3"},
        {"tuning_method": "magic"},
        {"rank": "8"},
        {"rank": -1},
        {"created_at": "yesterday"},
        {"dataset": []},
        {"target_modules": [1]},
    ],
)
def test_bad_values_are_rejected(tmp_path: Path, bad: dict) -> None:
    (tmp_path / "manifest.json").write_text(json.dumps(bad))
    with pytest.raises(ValueError):
        read_manifest(tmp_path)


def test_unparseable_manifest(tmp_path: Path) -> None:
    (tmp_path / "manifest.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"manifest\.json"):
        read_manifest(tmp_path)


def _adapter_dir(where: Path) -> Path:
    where.mkdir(parents=True)
    (where / "adapter_config.json").write_text('{"peft_type": "LORA", "r": 4}')
    (where / "adapter_model.safetensors").write_bytes(os.urandom(256))
    return where


def test_next_version_and_publish(tmp_path: Path) -> None:
    root = tmp_path / "root"
    assert next_version(root, "demo") == "1"
    src = _adapter_dir(tmp_path / "out")
    write_manifest(src, Manifest(method="lora", rank=4, metrics={"loss": 1.0}))
    assert publish(src, root, "demo") == "1"
    assert publish(src, root, "demo") == "2"
    (root / "demo" / "notaversion").mkdir()
    assert next_version(root, "demo") == "3"
    published = root / "demo" / "2"
    assert (published / "adapter_model.safetensors").read_bytes() == (
        src / "adapter_model.safetensors"
    ).read_bytes()
    m = read_manifest(published)
    assert m is not None and (m.name, m.version, m.rank, m.metrics) == ("demo", "2", 4, {"loss": 1.0})
    assert m.created_at
    # nothing half-written is left beside the versions
    assert sorted(p.name for p in (root / "demo").iterdir()) == ["1", "2", "notaversion"]


def test_publish_sweeps_what_a_killed_publisher_left(tmp_path: Path) -> None:
    root = tmp_path / "root"
    stale, live = root / "demo" / ".tmp-killed", root / "demo" / ".tmp-running"
    for d in (stale, live):
        (d / "adapter").mkdir(parents=True)
        (d / "adapter" / "adapter_model.safetensors").write_bytes(b"partial")
    two_hours_ago = time.time() - 2 * 3600
    os.utime(stale, (two_hours_ago, two_hours_ago))
    assert publish(_adapter_dir(tmp_path / "out"), root, "demo") == "1"
    assert not stale.exists()  # a publisher killed an hour or more ago
    assert live.is_dir()  # a publisher that may still be copying: left alone
    assert sorted(p.name for p in (root / "demo").iterdir()) == [".tmp-running", "1"]


def test_concurrent_publishers_get_distinct_versions(tmp_path: Path) -> None:
    root = tmp_path / "root"
    src = _adapter_dir(tmp_path / "out")
    got: list[str] = []
    threads = [threading.Thread(target=lambda: got.append(publish(src, root, "demo"))) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(got, key=int) == [str(i) for i in range(1, 7)]
    assert all((root / "demo" / v / "manifest.json").exists() for v in got)


def test_publish_refuses_bad_name(tmp_path: Path) -> None:
    src = _adapter_dir(tmp_path / "out")
    with pytest.raises(Exception, match="name"):
        publish(src, tmp_path / "root", "../evil")
