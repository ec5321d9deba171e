"""Snapshots: copies never follow a link out of the root, and stale folders of dead servers go."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from effllm.server.adapters.snapshot import PREFIX, Snapshots, sweep_stale
from effllm.server.engines.base import EffllmError


def _folder(adapter_root, tmp_path: Path) -> tuple[Path, Path]:
    root = tmp_path / "root"
    return root, shutil.copytree(adapter_root.root / "demo" / "1", root / "x" / "1")


def test_copies_regular_files_and_links_inside_the_root(adapter_root, tmp_path: Path) -> None:
    root, folder = _folder(adapter_root, tmp_path)
    real = root / "x" / "weights.bin"
    shutil.move(folder / "adapter_model.safetensors", real)
    (folder / "adapter_model.safetensors").symlink_to(real)
    snaps = Snapshots(tmp_path)
    copy = snaps.take(folder, "x@1", root)
    assert not (copy / "adapter_model.safetensors").is_symlink()
    assert (copy / "adapter_model.safetensors").read_bytes() == real.read_bytes()
    assert not (copy / "manifest.json").exists()
    assert copy.parent.name.startswith(f"{PREFIX}{os.getpid()}-")
    snaps.close()
    assert not copy.exists()


def test_the_copy_is_hashed_as_it_is_written(adapter_root, tmp_path: Path) -> None:
    """One read per file: the digest fed during the copy is manifest.content_hash of the copy (and of
    the source, byte for byte), manifest.json left out as content_hash leaves it out."""
    import hashlib

    from effllm.common.manifest import content_hash

    root, folder = _folder(adapter_root, tmp_path)
    (folder / "manifest.json").write_text('{"method": "lora"}')
    snaps = Snapshots(tmp_path)
    digest = hashlib.sha256()
    copy = snaps.take(folder, "x@1", root, digest)
    assert digest.hexdigest() == content_hash(copy) == content_hash(folder, root)
    (folder / "manifest.json").write_text('{"method": "rslora"}')  # not content: the hash stays
    again = hashlib.sha256()
    snaps.take(folder, "x@1", root, again)
    assert again.hexdigest() == digest.hexdigest()
    snaps.close()


def test_link_out_of_the_root_is_not_copied(adapter_root, tmp_path: Path) -> None:
    root, folder = _folder(adapter_root, tmp_path)
    secret = tmp_path / "secret.json"
    secret.write_text('{"method": "SECRET"}')
    (folder / "manifest.json").symlink_to(secret)
    snaps = Snapshots(tmp_path)
    with pytest.raises(EffllmError) as exc:
        snaps.take(folder, "x@1", root)
    assert "outside the adapter root" in exc.value.message and "SECRET" not in exc.value.message
    assert list(snaps.root.iterdir()) == []  # the half-made copy is gone
    snaps.close()


def test_sweep_removes_only_folders_of_dead_servers(tmp_path: Path) -> None:
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    gone = tmp_path / f"{PREFIX}{dead.pid}-abc"
    mine = tmp_path / f"{PREFIX}{os.getpid()}-def"
    alive = tmp_path / f"{PREFIX}1-ghi"  # pid 1 is always alive
    other = tmp_path / "unrelated"
    for d in (gone, mine, alive, other):
        (d / "a@1").mkdir(parents=True)
    assert sweep_stale(tmp_path) == [gone]
    assert not gone.exists() and mine.exists() and alive.exists() and other.exists()


def test_a_server_process_removes_its_own_folder_at_exit(tmp_path: Path) -> None:
    code = (
        "import sys; from pathlib import Path; from effllm.server.adapters.snapshot import Snapshots;"
        f"s = Snapshots(Path({str(tmp_path)!r})); print(s.root)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    made = Path(out.stdout.strip())
    assert made.parent == tmp_path and made.name.startswith(PREFIX) and not made.exists()


def test_concurrent_first_loads_share_one_snapshot_root(tmp_path: Path, monkeypatch) -> None:
    """Eight loads starting at once (worker threads) must see one root: with two, a copy made under the
    first was refused as outside the second (spurious INVALID_ARGUMENT under concurrent LoadAdapter)."""
    import threading
    import time

    import effllm.server.adapters.snapshot as snapshot

    made = snapshot.tempfile.mkdtemp

    def slow_mkdtemp(*args, **kwargs):  # widen the window the race needs
        time.sleep(0.05)
        return made(*args, **kwargs)

    monkeypatch.setattr(snapshot.tempfile, "mkdtemp", slow_mkdtemp)
    snaps = Snapshots(tmp_path)
    seen: list[Path] = []
    start = threading.Barrier(8)

    def first_use() -> None:
        start.wait()
        seen.append(snaps.root)

    threads = [threading.Thread(target=first_use) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(set(seen)) == 1
    assert len([p for p in tmp_path.iterdir() if p.name.startswith(PREFIX)]) == 1
    snaps.close()
