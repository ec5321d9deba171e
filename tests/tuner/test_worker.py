"""A tuning run killed midway (SIGKILL) leaves no output and no adapter version visible; publish is atomic."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from effllm.tuner import events
from effllm.tuner.events import DoneEvent, ErrorEvent, ProgressEvent
from effllm.tuner.publish import next_version, publish


def test_sigkill_mid_training_leaves_nothing_visible(tmp_path: Path) -> None:
    out, root = tmp_path / "runs" / "adapter", tmp_path / "adapters"
    spec = {
        "config": {
            "method": "lora",
            "data": "task:json_extract",
            "n_train": 64,
            "n_eval": 0,
            "max_steps": 200,
            "batch_size": 4,
            "max_length": 64,
            "output_dir": str(out),
        },
        "publish": {"server": "127.0.0.1:1", "name": "killed", "adapter_root": str(root)},
    }
    proc = subprocess.Popen(
        [sys.executable, "-m", "effllm.tuner.worker", json.dumps(spec)],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    try:
        assert proc.stdout is not None
        deadline = time.monotonic() + 600
        for line in proc.stdout:
            event = events.from_json(line)
            if isinstance(event, ProgressEvent) and event.step >= 2:
                break
            assert not isinstance(event, (DoneEvent, ErrorEvent)), event
            assert time.monotonic() < deadline, "no training progress within 600 s"
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
    finally:
        proc.kill()
    assert proc.returncode == -signal.SIGKILL
    assert not out.exists()
    assert not (out.parent.exists() and any(p for p in out.parent.iterdir() if not p.name.startswith(".")))
    assert not (root / "killed").exists() or next_version(root, "killed") == "1"


def test_publish_claims_next_version_atomically(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "adapter_config.json").write_text("{}")
    (src / "manifest.json").write_text(json.dumps({"name": "x", "version": ""}))
    root = tmp_path / "root"
    assert publish(src, root, "demo") == "1"
    (root / "demo" / ".staging-leftover").mkdir()  # a killed publisher's hidden leftovers are not versions
    (root / "demo" / "7").mkdir()
    assert publish(src, root, "demo") == "8"
    m = json.loads((root / "demo" / "8" / "manifest.json").read_text())
    assert (m["name"], m["version"]) == ("demo", "8")
    assert sorted(p.name for p in (root / "demo").iterdir()) == [".staging-leftover", "1", "7", "8"]
    with pytest.raises(ValueError, match=r"name: '\.\./evil'"):
        publish(src, root, "../evil")
