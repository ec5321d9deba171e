"""bench/_harness.py, the one bench harness: its closed loop against a real in-process gRPC server (fake
engine), and a pin that no bench script or scripts/ tool grows its own driver, launcher or machine record."""

from __future__ import annotations

import asyncio
import importlib.util
import re
import sys
from pathlib import Path
from types import ModuleType

import pytest

from ..server.fakeengine import FakeEngine
from ..server.test_app import serving

ROOT = Path(__file__).resolve().parents[2]
HARNESS = ROOT / "bench" / "_harness.py"


@pytest.fixture(scope="module")
def harness() -> ModuleType:
    # bench/ is scripts, not a package: load the file itself
    spec = importlib.util.spec_from_file_location("bench_harness", HARNESS)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_harness"] = module  # dataclasses resolve their module
    spec.loader.exec_module(module)
    return module


async def test_closed_loop_counts_received_tokens_and_failures(harness: ModuleType) -> None:
    async with serving() as live:
        target = f"127.0.0.1:{live.server.port}"
        requests = [{"prompt": "a b c", "max_new_tokens": 5} for _ in range(5)]
        requests.insert(2, {"prompt": "a b", "max_new_tokens": 5, "adapter": "nope"})  # NOT_FOUND
        loop = await harness.closed_loop(target, 2, requests, timeout=10, warm_up=requests[0])
    assert loop.counts == [5] * 5 and loop.tokens == 25
    assert len(loop.failures) == 1 and loop.failures[0].startswith("NOT_FOUND") and "nope" in loop.failures[0]
    assert len(loop.ttft_s) == 5 and all(t > 0 for t in loop.ttft_s) and loop.seconds > 0
    assert loop.tokens_per_s == pytest.approx(25 / loop.seconds)
    assert not loop.exact(6, 5)  # a failure is unequal work
    assert harness.Loop(counts=[5, 5]).exact(2, 5) and not harness.Loop(counts=[5, 4]).exact(2, 5)


async def test_closed_loop_keeps_exactly_c_requests_in_flight(harness: ModuleType) -> None:
    engine = FakeEngine()
    engine.token_interval_s = 0.01
    async with serving(engine, max_concurrency=8) as live:
        target = f"127.0.0.1:{live.server.port}"
        requests = [{"prompt": "a", "max_new_tokens": 6, "request_id": f"slow-{i}"} for i in range(8)]
        most = 0

        async def watch() -> None:
            nonlocal most
            while True:
                most = max(most, len(engine.inside))
                await asyncio.sleep(0.002)

        watcher = asyncio.create_task(watch())
        try:
            loop = await harness.closed_loop(target, 3, requests, timeout=10)
        finally:
            watcher.cancel()
    assert loop.exact(8, 6)
    assert most == 3  # a closed loop: never more than c, and c once it runs


def test_machine_record_and_report(harness: ModuleType, tmp_path: Path) -> None:
    record = harness.machine_record()
    assert record["cpu_model"] and record["cpu_count"] >= 1 and len(record["load_avg"]) == 3
    out = tmp_path / "deep" / "r.json"
    harness.write_report(out, {"rows": [1]}, record)
    text = out.read_text()
    assert '"rows"' in text and '"load_avg_end"' in text
    assert record["cpu_model"] in harness.header(record) and "load average" in harness.header(record)


# What only the harness may do. scripts/soak.py keeps its own client traffic (a churning mix of adapters,
# bursts and poison loads, not a closed loop), so AsyncEffllmClient is allowed there.
OWN = {
    "a server launcher": (re.compile(r"\bstart_server\(|Popen\([^)]*\"serve\""), ()),
    "a load average": (re.compile(r"os\.getloadavg\("), ()),
    "a machine description": (re.compile(r"telemetry\.machine import|def machine\("), ()),
    "a client driver": (re.compile(r"\bAsyncEffllmClient\("), ("scripts/soak.py",)),
}


def test_no_bench_script_has_its_own_driver_launcher_or_machine_record() -> None:
    files = [p for p in (ROOT / "bench").glob("*.py") if p != HARNESS] + list((ROOT / "scripts").glob("*.py"))
    assert len(files) > 10
    found = []
    for path in files:
        rel, text = str(path.relative_to(ROOT)), path.read_text()
        for what, (pattern, allowed) in OWN.items():
            if rel not in allowed and pattern.search(text):
                found.append(f"{rel}: {what} of its own (use bench/_harness.py)")
    assert not found, "\n".join(found)
