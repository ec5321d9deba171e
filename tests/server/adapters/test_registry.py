"""Registry logic on real adapter files. The engine here only records add/remove (the registry's contract
with an engine is the Protocol in server/engines/base.py); the real vLLM engine is exercised end to end in
tests/e2e/test_adapters_e2e.py."""

from __future__ import annotations

import asyncio

import pytest

from effllm.server.adapters.registry import AdapterRegistry, RegistryConfig
from effllm.server.engines.base import AdapterSpec, EffllmError, EngineInfo


class RecordingEngine:
    def __init__(self, fingerprint: str, methods: tuple[str, ...] = ("lora", "rslora")) -> None:
        self.info = EngineInfo(
            model="m",
            fingerprint=fingerprint,
            engine="recording",
            precision="fp32",
            max_context=1024,
            device="cpu",
            parameters=1,
            weight_bytes=4,
            precisions=("fp32",),
            adapter_methods=methods,
            max_adapter_rank=64,
        )
        self.loaded: dict[str, AdapterSpec] = {}
        self.log: list[str] = []

    async def add_adapter(self, spec: AdapterSpec) -> None:
        self.loaded[spec.key] = spec
        self.log.append(f"+{spec.key}")

    async def remove_adapter(self, key: str) -> None:
        del self.loaded[key]
        self.log.append(f"-{key}")


def _registry(adapter_root, *, max_resident: int = 8, max_rank: int = 16, wait: float = 5.0):
    engine = RecordingEngine(adapter_root.fingerprint)
    config = RegistryConfig(
        root=adapter_root.root, max_resident=max_resident, max_rank=max_rank, unload_wait_s=wait
    )
    return engine, AdapterRegistry(engine, adapter_root.base, config)  # type: ignore[arg-type]


async def test_load_latest_and_atomic_swap(adapter_root) -> None:
    engine, reg = _registry(adapter_root)
    e1 = await reg.load("demo", "1")
    assert e1.spec.key == "demo@1" and e1.spec.method == "lora" and e1.load_s > 0
    assert await reg.load("demo", "1") is e1  # idempotent
    running = reg.acquire("demo")
    assert running.spec.key == "demo@1"
    e2 = await reg.load("demo")  # empty version: highest on disk
    assert e2.spec.version == "2" and reg.latest("demo") is e2
    later = reg.acquire("demo")
    assert later.spec.key == "demo@2" and running.spec.key == "demo@1"
    assert reg.acquire("demo@1").spec.key == "demo@1"
    assert engine.log == ["+demo@1", "+demo@2"]


async def test_unknown_refs_are_not_found(adapter_root) -> None:
    _, reg = _registry(adapter_root)
    await reg.load("demo", "1")
    for ref in ("nobody", "demo@7"):
        with pytest.raises(EffllmError) as exc:
            reg.acquire(ref)
        assert exc.value.code == "not_found" and ref in exc.value.message
    assert "demo@1" in str(exc.value.message)  # the hint lists what is loaded


async def test_failed_validation_changes_nothing(adapter_root) -> None:
    engine, reg = _registry(adapter_root, max_resident=2)
    await reg.load("demo", "1")
    await reg.load("rs", "1")
    for name, code in (
        ("trunc", "failed_precondition"),
        ("big", "failed_precondition"),
        ("dora", "failed_precondition"),
        ("esc", "invalid_argument"),
        ("nope", "not_found"),
    ):
        with pytest.raises(EffllmError) as exc:
            await reg.load(name, "1")
        assert exc.value.code == code, (name, exc.value.message)
    with pytest.raises(EffllmError) as exc:
        await reg.load("demo", path="../outside/lora")
    assert exc.value.code == "invalid_argument"
    # at the resident limit, yet no eviction happened for the refused loads
    assert [e.key for e in reg.entries()] == ["demo@1", "rs@1"] and engine.log == ["+demo@1", "+rs@1"]


async def test_load_by_relative_path(adapter_root) -> None:
    _, reg = _registry(adapter_root)
    e = await reg.load("mine", path="f1/1")
    assert e.spec.key == "mine@1" and e.source == (adapter_root.root / "f1" / "1").resolve()
    # the engine reads a private snapshot of exactly those bytes (server/adapters/snapshot.py)
    weights = "adapter_model.safetensors"
    assert e.spec.path != e.source
    assert (e.spec.path / weights).read_bytes() == (e.source / weights).read_bytes()
    e = await reg.load("mine", "7", path="f2/1")
    assert e.spec.key == "mine@7" and reg.latest("mine") is e


async def test_unload_waits_for_leases_and_never_breaks_them(adapter_root) -> None:
    engine, reg = _registry(adapter_root)
    await reg.load("demo", "1")
    lease = reg.acquire("demo")
    unload = asyncio.create_task(reg.unload("demo", "1"))
    await asyncio.sleep(0.1)
    assert not unload.done() and "demo@1" in engine.loaded
    with pytest.raises(EffllmError):  # no new request gets a version that is leaving
        reg.acquire("demo")
    lease.release()
    lease.release()  # idempotent
    assert await unload == ["demo@1"]
    assert engine.log == ["+demo@1", "-demo@1"]


async def test_unload_gives_up_after_its_bound_and_restores(adapter_root) -> None:
    _, reg = _registry(adapter_root)
    await reg.load("demo", "1")
    lease = reg.acquire("demo@1")
    with pytest.raises(EffllmError) as exc:
        await reg.unload("demo", wait_s=0.2)
    assert exc.value.code == "failed_precondition" and "1 requests still in flight" in exc.value.message
    assert reg.acquire("demo").spec.key == "demo@1"  # routable again
    lease.release()


async def test_pin_blocks_unload_and_eviction_lru_order(adapter_root) -> None:
    engine, reg = _registry(adapter_root, max_resident=3)
    for name in ("f1", "f2", "f3"):
        await reg.load(name, "1")
    await reg.pin("f1")
    with pytest.raises(EffllmError) as exc:
        await reg.unload("f1")
    assert exc.value.code == "failed_precondition" and "pinned" in exc.value.message
    reg.acquire("f2").release()  # f2 used recently: f3 is now the least recently used unpinned one
    await reg.load("f4", "1")
    assert sorted(e.key for e in reg.entries()) == ["f1@1", "f2@1", "f4@1"] and "-f3@1" in engine.log
    busy = reg.acquire("f2")
    await reg.pin("f4")
    with pytest.raises(EffllmError) as exc:  # f1, f4 pinned and f2 busy: nothing may go
        await reg.load("demo", "1")
    assert exc.value.code == "resource_exhausted"
    busy.release()
    await reg.load("demo", "1")
    assert sorted(e.key for e in reg.entries()) == ["demo@1", "f1@1", "f4@1"]
    await reg.pin("f1", pinned=False)
    assert await reg.unload("f1") == ["f1@1"]


async def test_stats(adapter_root) -> None:
    _, reg = _registry(adapter_root)
    e = await reg.load("demo", "1")
    assert (e.requests_served, e.last_used_unix, e.residency) == (0, 0.0, "host")
    lease = reg.acquire("demo")
    assert e.in_flight == 1 and e.residency == "slot" and e.last_used_unix > 0
    lease.release()
    assert (e.in_flight, e.requests_served, e.residency) == (0, 1, "host")


async def test_without_root_loads_are_refused(adapter_root) -> None:
    engine = RecordingEngine(adapter_root.fingerprint)
    reg = AdapterRegistry(engine, None, RegistryConfig())  # type: ignore[arg-type]
    with pytest.raises(EffllmError) as exc:
        await reg.load("demo", "1")
    assert exc.value.code == "failed_precondition" and "--adapter-root" in exc.value.message
