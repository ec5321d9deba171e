"""Faults against the real server: a client that vanishes mid-stream, the engine raising mid-batch, adapter
files corrupted or deleted while loading, the tuner killed while publishing. After each, the server serves
and (for adapters) the adapter root and the resident set are consistent."""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest

from effllm.client import EffllmClient

from ..serverproc import ServerProcess
from .conftest import Hardened

COUNTING = "Count from 1 to 500, separated by commas: 1, 2, 3, 4,"


def _wait_idle(client: EffllmClient, timeout: float = 15.0) -> tuple[float, object]:
    t0 = time.perf_counter()
    while True:
        stats = client.stats()
        if stats.running == 0 and stats.engine_running == 0 and stats.queued == 0:
            return time.perf_counter() - t0, stats
        assert time.perf_counter() - t0 < timeout, f"slot not freed: {stats}"
        time.sleep(0.05)


def test_client_killed_mid_stream_frees_its_slot(vllm_server: ServerProcess) -> None:
    script = textwrap.dedent(f"""
        import sys
        from effllm.client import EffllmClient
        c = EffllmClient({vllm_server.target!r}, timeout=300)
        for chunk in c.stream({COUNTING!r}, max_new_tokens=900, temperature=0):
            if chunk.text:
                print("FIRST", flush=True)
    """)
    with vllm_server.client(timeout=30) as c:
        before = c.stats()
        proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
        try:
            assert proc.stdout is not None
            assert proc.stdout.readline().strip() == "FIRST"
            during = c.stats()
            assert during.running >= 1 and during.engine_running >= 1
            proc.send_signal(signal.SIGKILL)  # no goodbye: the TCP connection just drops
            proc.wait(10)
        finally:
            if proc.poll() is None:
                proc.kill()
        freed_s, after = _wait_idle(c)
        assert after.requests_cancelled == before.requests_cancelled + 1  # type: ignore[attr-defined]
        assert c.generate("Say hi", max_new_tokens=2).usage.output_tokens >= 1
    print(f"slot freed {freed_s:.2f}s after the client was killed")


def test_engine_raising_mid_batch_fails_only_that_request(hardened: Hardened) -> None:
    """`fault-*` requests raise inside the engine stream after 2 events (EFFLLM_FAILPOINTS); the healthy
    request decoded in the same batch must finish with exactly the text it gets when run alone."""
    prompt = "List five fruits:"
    with EffllmClient(hardened.server.target, security=hardened.security("generate"), timeout=60) as c:
        alone = c.generate(prompt, max_new_tokens=24, temperature=0, request_id="solo-1").text

        def run(request_id: str) -> tuple[str, str]:
            try:
                return "OK", c.generate(prompt, max_new_tokens=24, temperature=0, request_id=request_id).text
            except grpc.RpcError as err:
                return err.code().name, err.details() or ""

        with ThreadPoolExecutor(2) as pool:
            doomed, healthy = pool.map(run, ["fault-1", "healthy-1"])
        assert doomed == ("INTERNAL", "engine failed on this request: RuntimeError"), doomed
        assert healthy == ("OK", alone)
        _wait_idle(c)
        # Streaming: the doomed request got its first tokens, then the error; nothing is left running.
        chunks: list[str] = []
        with pytest.raises(grpc.RpcError) as info:
            for chunk in c.stream(prompt, max_new_tokens=24, temperature=0, request_id="fault-2"):
                chunks.append(chunk.text)
        assert info.value.code() == grpc.StatusCode.INTERNAL and len(chunks) >= 1
        _wait_idle(c)
        assert c.health() == "SERVING"
        assert c.generate(prompt, max_new_tokens=24, temperature=0, request_id="after-1").text == alone


def _tree_digest(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def _damage(folder: Path, how: str) -> None:
    weights = folder / "adapter_model.safetensors"
    if how == "delete":
        shutil.rmtree(folder, ignore_errors=True)
    elif how == "truncate":
        with contextlib.suppress(FileNotFoundError):
            data = weights.read_bytes()
            weights.write_bytes(data[: len(data) // 3])
    else:  # garbage over the header: the safetensors length prefix and JSON are nonsense
        with contextlib.suppress(FileNotFoundError), weights.open("r+b") as f:
            f.write(b"\xff" * 64)


@pytest.mark.parametrize("how", ["delete", "truncate", "garble"])
def test_adapter_damaged_while_loading(hardened: Hardened, how: str) -> None:
    """Load an adapter while its files are deleted / cut short / overwritten, at a few offsets into the
    load. Each load either succeeds on a complete copy or is refused cleanly; whatever is listed afterwards
    serves; the server keeps serving; the rest of the adapter root is untouched."""
    assert hardened.adapter_root is not None, "the hardened server runs with --adapter-root"
    root = hardened.adapter_root
    good = root / "good" / "1"
    untouched = _tree_digest(good)
    codes: list[str] = []
    with EffllmClient(hardened.server.target, security=hardened.security("admin"), timeout=120) as c:
        for i, delay in enumerate((0.0, 0.005, 0.02, 0.1)):
            folder = root / f"{how}{i}" / "1"
            shutil.copytree(good, folder)
            with ThreadPoolExecutor(1) as pool:
                future = pool.submit(c.load_adapter, f"{how}{i}", "1")
                time.sleep(delay)
                _damage(folder, how)
                try:
                    future.result()
                    codes.append("OK")
                except grpc.RpcError as err:
                    assert err.code().name in ("FAILED_PRECONDITION", "NOT_FOUND", "INVALID_ARGUMENT"), (
                        err.code(),
                        err.details(),
                    )
                    codes.append(err.code().name)
        listed = {a.name for a in c.list_adapters()}
        for name in sorted(n for n in listed if n.startswith(how)):
            # Loaded before the damage landed: the engine holds its own copy and must serve it.
            reply = c.generate("Hello", adapter=name, max_new_tokens=2, temperature=0)
            assert reply.adapter == f"{name}@1"
            c.unload_adapter(name)
        assert c.load_adapter("good", "1").name == "good"
        assert c.generate("Hello", adapter="good", max_new_tokens=2).usage.output_tokens >= 1
        assert c.health() == "SERVING"
        _wait_idle(c)
    assert _tree_digest(good) == untouched
    print(f"adapter {how} while loading: {codes}")


_PUBLISH = """
import sys
from pathlib import Path
try:  # the tuner's own publish step when the tuner is installed, else the server-side half it delegates to
    from effllm.tuner.publish import publish
except ImportError:
    from effllm.common.manifest import publish
print("published", publish(Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]), flush=True)
"""


def test_tuner_killed_while_publishing(hardened: Hardened, tmp_path: Path) -> None:
    """SIGKILL a publishing process (the tuner's publish: copy to ROOT/NAME/.tmp-*, fsync, rename) at
    several points. Only whole versions ever appear in the root: each one loads and serves; leftovers are
    hidden temp folders no request can name; the server keeps serving."""
    assert hardened.adapter_root is not None, "the hardened server runs with --adapter-root"
    root = hardened.adapter_root
    src = tmp_path / "tuned-out"
    shutil.copytree(root / "good" / "1", src)
    (src / "padding.bin").write_bytes(os.urandom(64 << 20))  # makes the copy long enough to be cut
    outcomes = []
    for delay in (0.05, 0.15, 0.3, 0.6, 1.0, 30.0):
        proc = subprocess.Popen(
            [sys.executable, "-c", _PUBLISH, str(src), str(root), "tuned"], stdout=subprocess.PIPE, text=True
        )
        try:
            proc.wait(delay)
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGKILL)
            proc.wait(10)
        outcomes.append("finished" if proc.returncode == 0 else f"killed after {delay}s")
    folder = root / "tuned"
    versions = sorted(p.name for p in folder.iterdir() if not p.name.startswith("."))
    leftovers = sorted(p.name for p in folder.iterdir() if p.name.startswith("."))
    assert outcomes[-1] == "finished" and versions, (outcomes, versions)
    with EffllmClient(hardened.server.target, security=hardened.security("admin"), timeout=120) as c:
        for version in versions:  # every version that appeared is whole: it validates and serves
            assert (folder / version / "padding.bin").stat().st_size == 64 << 20
            c.load_adapter("tuned", version)
            reply = c.generate("Hello", adapter=f"tuned@{version}", max_new_tokens=2, temperature=0)
            assert reply.adapter == f"tuned@{version}"
            c.unload_adapter("tuned", version)
        for name in leftovers:  # a half-copied temp folder is not a version anyone can load
            with pytest.raises(grpc.RpcError) as info:
                c.load_adapter("tuned", name)
            assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert c.health() == "SERVING"
    print(f"publish killed: {outcomes}; versions {versions}; hidden leftovers {len(leftovers)}")
