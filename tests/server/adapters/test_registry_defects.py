"""Registry defects of issue 12 and the adapter identity / probe rules (each failed before its fix):
a failed load evicts nothing, unload waits outside the lock, PinAdapter "*" pins every version,
NAME@VERSION keeps one content, a probe with non-finite logits keeps a version from being routable,
and nothing unforeseen surfaces as anything but failed_precondition."""

from __future__ import annotations

import asyncio
import shutil
from pathlib import Path

import pytest

from effllm.server.adapters.registry import AdapterRegistry, RegistryConfig
from effllm.server.engines.base import AdapterSpec, EffllmError

from .test_registry import RecordingEngine


class ProbedEngine(RecordingEngine):
    """Records like RecordingEngine; `refuse` keys fail add_adapter, `nan` keys fail the probe."""

    def __init__(self, fingerprint: str) -> None:
        super().__init__(fingerprint)
        self.refuse: set[str] = set()
        self.nan: set[str] = set()
        self.crash: set[str] = set()
        self.explain: dict[str, str] = {}  # key -> the EffllmError message its probe raises
        self.probed: list[str] = []

    async def add_adapter(self, spec: AdapterSpec) -> None:
        if spec.key in self.refuse:
            raise RuntimeError("worker said no")  # not an EffllmError: the registry must map it
        await super().add_adapter(spec)

    async def probe_adapter(self, spec: AdapterSpec) -> bool:
        self.probed.append(spec.key)
        if spec.key in self.crash:
            raise ValueError("probe crashed")
        if spec.key in self.explain:
            raise EffllmError("failed_precondition", self.explain[spec.key])
        return spec.key not in self.nan


def _registry(adapter_root, root: Path | None = None, *, max_resident: int = 8, wait: float = 5.0):
    engine = ProbedEngine(adapter_root.fingerprint)
    config = RegistryConfig(
        root=root or adapter_root.root, max_resident=max_resident, max_rank=16, unload_wait_s=wait
    )
    return engine, AdapterRegistry(engine, adapter_root.base, config)  # type: ignore[arg-type]


async def test_failed_engine_load_evicts_nothing(adapter_root) -> None:
    engine, reg = _registry(adapter_root, max_resident=2)
    await reg.load("f1", "1")
    await reg.load("f2", "1")
    engine.refuse.add("f3@1")
    with pytest.raises(EffllmError) as exc:
        await reg.load("f3", "1")
    assert exc.value.code == "failed_precondition" and "f3@1" in exc.value.message
    assert sorted(e.key for e in reg.entries()) == ["f1@1", "f2@1"]  # before the fix: f1 was evicted
    assert engine.log == ["+f1@1", "+f2@1"]
    await reg.load("f4", "1")  # a good load still evicts the least recently used one, after it is in
    assert engine.log[-2:] == ["+f4@1", "-f1@1"]


async def test_probe_with_non_finite_logits_is_refused_and_evicts_nothing(adapter_root) -> None:
    engine, reg = _registry(adapter_root, max_resident=2)
    await reg.load("f1", "1")
    await reg.load("f2", "1")
    engine.nan.add("f3@1")
    with pytest.raises(EffllmError) as exc:
        await reg.load("f3", "1")
    assert exc.value.code == "failed_precondition" and "not finite" in exc.value.message
    assert "f3@1" in engine.probed and "f3@1" not in engine.loaded
    assert sorted(e.key for e in reg.entries()) == ["f1@1", "f2@1"]
    with pytest.raises(EffllmError):
        reg.acquire("f3")
    engine.crash.add("f4@1")
    with pytest.raises(EffllmError) as exc:
        await reg.load("f4", "1")
    assert exc.value.code == "failed_precondition" and "probe failed" in exc.value.message
    # an engine that says what is wrong (vLLM's lora_delta) is quoted as it is, never as a crash
    engine.crash.clear()
    engine.explain["f4@1"] = "its update of q_proj on a probe input is not finite"
    with pytest.raises(EffllmError) as exc:
        await reg.load("f4", "1")
    assert exc.value.message == "adapter: f4@1 refused: its update of q_proj on a probe input is not finite"
    assert "f4@1" not in engine.loaded and sorted(e.key for e in reg.entries()) == ["f1@1", "f2@1"]


async def test_unload_waits_outside_the_lock(adapter_root) -> None:
    engine, reg = _registry(adapter_root, wait=30.0)
    await reg.load("demo", "1")
    await reg.load("f1", "1")
    lease = reg.acquire("demo@1")
    unload = asyncio.create_task(reg.unload("demo", "1"))
    await asyncio.sleep(0.05)
    # Before the fix these waited for the unload's 30 s bound (the lock was held while waiting).
    await asyncio.wait_for(reg.load("f2", "1"), timeout=10)
    await asyncio.wait_for(reg.pin("f1"), timeout=2)
    with pytest.raises(EffllmError) as exc:  # the leaving version cannot be loaded again meanwhile
        await asyncio.wait_for(reg.load("demo", "1"), timeout=10)
    assert "being unloaded" in exc.value.message
    assert not unload.done()
    lease.release()
    assert await asyncio.wait_for(unload, timeout=5) == ["demo@1"]
    assert "demo@1" not in engine.loaded


async def test_cancelled_unload_restores_routing(adapter_root) -> None:
    _, reg = _registry(adapter_root)
    await reg.load("demo", "1")
    lease = reg.acquire("demo@1")
    unload = asyncio.create_task(reg.unload("demo", "1"))
    await asyncio.sleep(0.05)
    unload.cancel()
    with pytest.raises(asyncio.CancelledError):
        await unload
    assert reg.acquire("demo").spec.key == "demo@1"
    lease.release()


async def test_pin_star_pins_every_version(adapter_root) -> None:
    _, reg = _registry(adapter_root)
    await reg.load("demo", "1")
    await reg.load("demo", "2")
    entry = await reg.pin("demo", "*")  # before the fix: ValueError -> INTERNAL
    assert entry.spec.key == "demo@2"
    assert all(e.pinned for e in reg.entries())
    for version in ("1", "2"):
        with pytest.raises(EffllmError) as exc:
            await reg.unload("demo", version)
        assert "pinned" in exc.value.message
    await reg.pin("demo", "*", pinned=False)
    assert not any(e.pinned for e in reg.entries())
    assert (await reg.pin("demo")).spec.key == "demo@2" and not reg._routable("demo@1").pinned  # type: ignore[union-attr]


async def test_a_version_keeps_one_content(adapter_root, tmp_path: Path) -> None:
    root = tmp_path / "root"
    shutil.copytree(adapter_root.root / "demo" / "1", root / "x" / "1")
    shutil.copytree(adapter_root.root / "demo" / "1", root / "same" / "1")
    _, reg = _registry(adapter_root, root)
    first = await reg.load("x", "1")
    assert len(first.spec.content_sha256) == 64
    for f in ("adapter_config.json", "adapter_model.safetensors"):  # re-published in place: other bytes
        shutil.copy(adapter_root.root / "demo" / "2" / f, root / "x" / "1" / f)
    with pytest.raises(EffllmError) as exc:  # loaded: not silently the old one
        await reg.load("x", "1")
    assert exc.value.code == "failed_precondition" and "x@1" in exc.value.message
    await reg.unload("x", "1")
    with pytest.raises(EffllmError) as exc:  # unloaded: still the same rule for the server's life
        await reg.load("x", "1")
    assert exc.value.code == "failed_precondition" and "re-published" in exc.value.message
    # the same bytes under another name/version load, and reloading identical content is fine
    again = await reg.load("same", "1")
    assert again.spec.content_sha256 == first.spec.content_sha256
    await reg.unload("same", "1")
    assert (await reg.load("same", "1")).spec.content_sha256 == first.spec.content_sha256


async def test_unforeseen_errors_become_failed_precondition(adapter_root, monkeypatch) -> None:
    engine, reg = _registry(adapter_root)

    def broken(*_args, **_kw):
        raise KeyError("surprise")

    monkeypatch.setattr(reg._snapshots, "take", broken)
    with pytest.raises(EffllmError) as exc:
        await reg.load("demo", "1")
    assert exc.value.code == "failed_precondition" and "KeyError" in exc.value.message
    assert engine.log == [] and not reg.entries()
