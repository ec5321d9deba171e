"""Adapters end to end: a real `effllm serve --engine vllm --adapter-root ...` and real PEFT adapters.

The session's adapter server (tests/e2e/conftest.py: resident limit 4, max rank 16, demo@1 preloaded; also
test_tune_publish's). Every test leaves the server with only demo@1 loaded, so the tests do not depend on
each other's order.
"""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator

import grpc
import pytest

from effllm.client import AsyncEffllmClient, EffllmClient

from ..serverproc import ServerProcess

# Generous: on a 2-core machine shared with other jobs one 8-token request has taken over a minute.
pytestmark = pytest.mark.timeout(1800)

PROMPT = "The capital of France is"
NEW = 8
SWAP_NEW = 16


@pytest.fixture(scope="module")
def server(adapter_server: ServerProcess) -> ServerProcess:
    return adapter_server


@pytest.fixture(scope="module")
def client(server: ServerProcess) -> Iterator[EffllmClient]:
    with server.client(timeout=600.0) as c:
        yield c


@pytest.fixture(autouse=True)
def only_demo_left(client: EffllmClient) -> Iterator[None]:
    yield
    for a in client.list_adapters():
        if a.pinned:
            client.pin_adapter(a.name, a.version, pinned=False)
        if (a.name, a.version) != ("demo", "1"):
            client.unload_adapter(a.name, a.version)
    if not any(a.name == "demo" for a in client.list_adapters()):
        client.load_adapter("demo", "1")


def greedy(client: EffllmClient, adapter: str = "", n: int = NEW) -> tuple[list[int], str]:
    reply = client.generate(PROMPT, adapter=adapter, max_new_tokens=n, temperature=0.0)
    return list(reply.token_ids), reply.adapter


@pytest.fixture(scope="module")
def reference(client: EffllmClient) -> dict[str, list[int]]:
    """Greedy tokens per adapter, each asked alone, before any test changes the server."""
    out = {"": greedy(client)[0], "demo@1": greedy(client, "demo@1")[0]}
    for name in ("demo@2", "rs@1", "wide@1"):
        n, v = name.split("@")
        client.load_adapter(n, v)
        out[name] = greedy(client, name)[0]
        client.unload_adapter(n, v)
    return out


def _code(fn, *args, **kw) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as exc:
        fn(*args, **kw)
    return exc.value.code(), exc.value.details()


def test_preloaded_adapter_is_listed(client: EffllmClient, adapter_root) -> None:
    (a,) = client.list_adapters()
    assert (a.name, a.version, a.method, a.rank, a.alpha) == ("demo", "1", "lora", 8, 16.0)
    assert sorted(a.target_modules) == ["q_proj", "v_proj"]
    assert a.base_fingerprint == ""  # a plain PEFT folder: no manifest
    assert a.residency == "host" and a.latest and not a.pinned and a.load_s > 0 and a.in_flight == 0
    info = client.model_info()
    assert list(info.capabilities.adapter_methods) == ["lora", "rslora"]
    assert info.capabilities.max_adapters_per_batch == 4


def test_adapter_changes_output_and_name_equals_explicit_version(client, reference, adapter_root) -> None:
    t0 = time.time()
    base = reference[""]
    assert all(reference[k] != base for k in ("demo@1", "demo@2", "rs@1", "wide@1")), reference
    assert reference["demo@1"] != reference["demo@2"]
    tokens, used = greedy(client, "demo")
    assert tokens == reference["demo@1"] and used == "demo@1"
    info = client.load_adapter("rs", "1")
    assert (info.method, info.base_fingerprint) == ("rslora", adapter_root.fingerprint)
    assert greedy(client, "rs") == (reference["rs@1"], "rs@1")
    assert greedy(client) == (base, "")
    served = {f"{a.name}@{a.version}": a for a in client.list_adapters()}
    assert served["demo@1"].requests_served >= 1 and served["demo@1"].last_used_unix >= t0
    assert served["rs@1"].requests_served == 1


def test_mixed_batch_matches_peft_reference(client, server, reference, adapter_root) -> None:
    """Base + 4 different adapters (LoRA, rsLoRA) in flight together; each row equals PEFT run alone."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    for key in ("demo@2", "rs@1", "wide@1"):
        client.load_adapter(*key.split("@"))
    keys = ["", "demo@1", "demo@2", "rs@1", "wide@1"]

    async def batch() -> list[list[int]]:
        async with AsyncEffllmClient(server.target, timeout=600.0) as ac:
            replies = await asyncio.gather(
                *(ac.generate(PROMPT, adapter=k, max_new_tokens=NEW, temperature=0.0) for k in keys * 2)
            )
        return [list(r.token_ids) for r in replies]

    rows = asyncio.run(batch())
    for i, key in enumerate(keys):
        assert rows[i] == rows[i + len(keys)] == reference[key], key

    tok = AutoTokenizer.from_pretrained(adapter_root.base)
    ids = torch.tensor([tok.encode(PROMPT, add_special_tokens=True)])
    base = AutoModelForCausalLM.from_pretrained(adapter_root.base, dtype=torch.float32)
    model = PeftModel.from_pretrained(base, adapter_root.root / "demo" / "1", adapter_name="demo@1")
    for key in keys[2:]:
        model.load_adapter(adapter_root.root / key.replace("@", "/"), adapter_name=key)
    model.eval()
    for i, key in enumerate(keys):
        with torch.no_grad():
            if key:
                model.set_adapter(key)
                out = model.generate(input_ids=ids, max_new_tokens=NEW, do_sample=False)
            else:
                with model.disable_adapter():
                    out = model.generate(input_ids=ids, max_new_tokens=NEW, do_sample=False)
        assert out[0, ids.shape[1] :].tolist() == rows[i], f"{key or 'base'}: vLLM differs from PEFT"


BAD = [
    (("missing", "1"), {}, grpc.StatusCode.FAILED_PRECONDITION, "adapter_model.safetensors: missing"),
    (("trunc", "1"), {}, grpc.StatusCode.FAILED_PRECONDITION, "truncated"),
    (("wrongbase", "1"), {}, grpc.StatusCode.FAILED_PRECONDITION, "base_fingerprint"),
    (("big", "1"), {}, grpc.StatusCode.FAILED_PRECONDITION, "rank: 32 is over this server's max"),
    (("dora", "1"), {}, grpc.StatusCode.FAILED_PRECONDITION, "dora adapters are not supported"),
    (("x",), {"path": "../outside/lora"}, grpc.StatusCode.INVALID_ARGUMENT, "may not leave the root"),
    (("x",), {"path": "/etc"}, grpc.StatusCode.INVALID_ARGUMENT, "absolute"),
    (("esc", "1"), {}, grpc.StatusCode.INVALID_ARGUMENT, "outside the adapter root"),
    (("x",), {"path": "esc/1"}, grpc.StatusCode.INVALID_ARGUMENT, "outside the adapter root"),
    (("fsym", "1"), {}, grpc.StatusCode.INVALID_ARGUMENT, "outside the adapter root"),
    (("../x", "1"), {}, grpc.StatusCode.INVALID_ARGUMENT, "not a valid adapter name"),
    (("nobody", "1"), {}, grpc.StatusCode.NOT_FOUND, "does not exist"),
]


def test_bad_adapters_get_their_status_and_the_server_keeps_serving(client, reference) -> None:
    for args, kw, code, needle in BAD:
        got, message = _code(client.load_adapter, *args, **kw)
        assert (got, needle in message) == (code, True), (args, kw, got, message)
    assert _code(client.generate, PROMPT, adapter="nobody", max_new_tokens=4) == (
        grpc.StatusCode.NOT_FOUND,
        "adapter: 'nobody' is not loaded (LoadAdapter it first)",
    )
    # nothing changed: demo@1 alone is resident and both it and the base still give their outputs
    assert [(a.name, a.version) for a in client.list_adapters()] == [("demo", "1")]
    assert greedy(client, "demo")[0] == reference["demo@1"]
    assert greedy(client)[0] == reference[""]
    assert client.health() == "SERVING"


async def _stream(ac: AsyncEffllmClient, adapter: str, started: asyncio.Event | None = None) -> dict:
    tokens: list[int] = []
    final = None
    async for chunk in ac.stream(PROMPT, adapter=adapter, max_new_tokens=SWAP_NEW, temperature=0.0):
        tokens.extend(chunk.token_ids)
        if started is not None and tokens:
            started.set()
        if chunk.HasField("final"):
            final = chunk.final
    assert final is not None
    return {
        "tokens": tokens,
        "adapter": final.adapter,
        "end": time.monotonic(),
        "n": final.usage.output_tokens,
    }


def test_hot_swap_under_16_streams(client, server) -> None:
    client.load_adapter("swap", "1")
    v1 = greedy(client, "swap@1", SWAP_NEW)[0]

    async def run() -> tuple[list, list, float]:
        async with AsyncEffllmClient(server.target, timeout=600.0) as ac:
            started = [asyncio.Event() for _ in range(16)]
            early = [asyncio.create_task(_stream(ac, "swap", s)) for s in started]
            await asyncio.wait_for(asyncio.gather(*(s.wait() for s in started)), 600)
            info = await ac.load_adapter("swap", "2")  # mid-flight
            assert info.latest and info.version == "2"
            still_running = sum(not t.done() for t in early)
            late = [asyncio.create_task(_stream(ac, "swap")) for _ in range(8)]
            done = await asyncio.gather(*early, *late, return_exceptions=True)
            return done[:16], done[16:], still_running

    early, late, still_running = asyncio.run(run())
    failures = [r for r in early + late if isinstance(r, BaseException)]
    assert failures == []
    assert still_running > 0, "the swap happened after the streams ended: not a mid-flight test"
    v2 = greedy(client, "swap@2", SWAP_NEW)[0]
    assert v1 != v2
    for r in early:
        assert (r["adapter"], r["tokens"]) == ("swap@1", v1)
    for r in late:
        assert (r["adapter"], r["tokens"]) == ("swap@2", v2)
    listed = {f"{a.name}@{a.version}": a for a in client.list_adapters()}
    assert listed["swap@2"].latest and not listed["swap@1"].latest
    assert listed["swap@1"].requests_served == 17 and listed["swap@2"].requests_served == 9


def test_unload_waits_for_in_flight_requests(client, server) -> None:
    client.load_adapter("swap", "1")

    async def run() -> tuple[list, float, list[str]]:
        async with AsyncEffllmClient(server.target, timeout=600.0) as ac:
            started = [asyncio.Event() for _ in range(4)]
            streams = [asyncio.create_task(_stream(ac, "swap@1", s)) for s in started]
            await asyncio.wait_for(asyncio.gather(*(s.wait() for s in started)), 600)
            unloaded = await ac.unload_adapter("swap", "1", wait_s=300)
            return await asyncio.gather(*streams), time.monotonic(), unloaded

    results, unloaded_at, keys = asyncio.run(run())
    assert keys == ["swap@1"]
    assert all(r["adapter"] == "swap@1" and r["n"] == SWAP_NEW for r in results)
    assert max(r["end"] for r in results) <= unloaded_at
    assert _code(client.generate, PROMPT, adapter="swap@1", max_new_tokens=2)[0] == grpc.StatusCode.NOT_FOUND


def test_pin_blocks_unload_and_eviction_then_lru(client) -> None:
    assert client.pin_adapter("demo").pinned
    code, message = _code(client.unload_adapter, "demo")
    assert code == grpc.StatusCode.FAILED_PRECONDITION and "pinned" in message
    for name in ("f1", "f2", "f3"):
        client.load_adapter(name, "1")
    greedy(client, "f1", 2)  # f1 used: f2 is now the least recently used unpinned one
    client.load_adapter("f4", "1")  # 5th: evicts f2
    resident = sorted(f"{a.name}@{a.version}" for a in client.list_adapters())
    assert resident == ["demo@1", "f1@1", "f3@1", "f4@1"]
    assert _code(client.generate, PROMPT, adapter="f2", max_new_tokens=2)[0] == grpc.StatusCode.NOT_FOUND
    for name in ("f1", "f3", "f4"):
        client.pin_adapter(name)
    code, message = _code(client.load_adapter, "f2", "1")
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and "pinned" in message
    assert _code(client.pin_adapter, "nobody")[0] == grpc.StatusCode.NOT_FOUND


def test_adapters_cli(server) -> None:
    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        cmd = [sys.executable, "-m", "effllm.cli.main", "adapters", "--target", server.target, *args]
        return subprocess.run(cmd, capture_output=True, text=True, timeout=60)

    out = cli("load", "rs@1")
    assert out.returncode == 0 and "rs@1" in out.stdout and "rslora" in out.stdout
    out = cli("pin", "rs")
    assert out.returncode == 0 and "yes" in out.stdout
    out = cli("list")
    assert out.returncode == 0 and "demo@1" in out.stdout and "rs@1" in out.stdout
    out = cli("unload", "rs")
    assert out.returncode == 1 and "FAILED_PRECONDITION" in out.stderr
    assert cli("pin", "rs", "--off").returncode == 0
    out = cli("unload", "rs@1")
    assert out.returncode == 0 and "unloaded rs@1" in out.stdout
    out = cli("load", "trunc@1")
    assert out.returncode == 1 and "truncated" in out.stderr


def _link_version(root, name: str, version: int, source: str) -> None:
    """ROOT/NAME/VERSION whose files are links to ROOT/SOURCE's (inside the root: allowed, and cheap)."""
    folder = root / name / str(version)
    folder.mkdir(parents=True, exist_ok=True)
    for f in ("adapter_config.json", "adapter_model.safetensors"):
        if not (folder / f).exists():
            (folder / f).symlink_to(root / source / f)


def test_identity_one_content_per_version_with_prefix_caching(client, reference, adapter_root) -> None:
    """vLLM's prefix cache is on by default; a version's KV must never serve another content."""
    from effllm.common.manifest import content_hash

    root = adapter_root.root
    ident = root / "ident"
    shutil.rmtree(ident, ignore_errors=True)
    shutil.copytree(root / "demo" / "1", ident / "1")
    info = client.load_adapter("ident", "1")
    assert info.content_sha256 == content_hash(ident / "1", root)
    assert greedy(client, "ident@1")[0] == reference["demo@1"]
    assert greedy(client, "ident@1")[0] == reference["demo@1"]  # this one may come from the prefix cache
    client.unload_adapter("ident", "1")
    original = {
        f: (ident / "1" / f).read_bytes() for f in ("adapter_config.json", "adapter_model.safetensors")
    }
    for f in original:  # re-published in place with other content
        shutil.copy(root / "demo" / "2" / f, ident / "1" / f)
    code, details = _code(client.load_adapter, "ident", "1")
    assert code == grpc.StatusCode.FAILED_PRECONDITION and "ident@1" in details
    shutil.copytree(root / "demo" / "2", ident / "2")
    assert client.load_adapter("ident", "2").content_sha256 != info.content_sha256
    assert greedy(client, "ident")[0] == reference["demo@2"]  # same prompt: no KV of ident@1 reused
    client.unload_adapter("ident", "2")
    for f, data in original.items():
        (ident / "1" / f).write_bytes(data)
    assert client.load_adapter("ident", "1").content_sha256 == info.content_sha256
    assert greedy(client, "ident")[0] == reference["demo@1"]


CHURN_ROUNDS = 30
CHURN_NEW = 4  # tokens per churn request: enough to tell the alternating contents apart (asserted below)


def test_adapter_churn_under_8_streams(client, server, reference, adapter_root) -> None:
    """8 streams on two adapter names while each is re-versioned 30 times (load the next version, then
    unload the previous; the two names churn at the same time): zero failed requests, and every reply comes
    from the version its request resolved — the version named in its final message, whose tokens it must
    carry."""
    root = adapter_root.root
    sources = {"ca": ("demo/1", "demo/2"), "cb": ("rs/1", "wide/1")}
    expected: dict[str, list[int]] = {}
    for name, (odd, even) in sources.items():
        first = {src: reference[src.replace("/", "@")][:CHURN_NEW] for src in (odd, even)}
        # consecutive versions differ in their first tokens: a reply from the wrong version cannot pass
        assert first[odd] != first[even], (name, first)
        shutil.rmtree(root / name, ignore_errors=True)
        for v in range(1, CHURN_ROUNDS + 2):
            src = odd if v % 2 else even
            _link_version(root, name, v, src)
            expected[f"{name}@{v}"] = first[src]
    # ca and cb hold up to 4 versions between them, the resident limit: demo@1 makes way (only_demo_left
    # loads it again), so no eviction can take a version the test still uses.
    client.unload_adapter("demo", "1")
    for name in sources:
        client.load_adapter(name, "1")

    async def run() -> tuple[list, list[int]]:
        async with AsyncEffllmClient(server.target, timeout=600.0) as ac:
            done = asyncio.Event()
            results: list = []

            async def stream(name: str) -> None:
                while not done.is_set():
                    reply = await ac.generate(PROMPT, adapter=name, max_new_tokens=CHURN_NEW, temperature=0.0)
                    results.append((reply.adapter, list(reply.token_ids)))

            async def churn(name: str) -> int:
                rounds = 0
                for v in range(1, CHURN_ROUNDS + 1):
                    info = await ac.load_adapter(name, str(v + 1))
                    assert info.latest and len(info.content_sha256) == 64
                    await ac.unload_adapter(name, str(v), wait_s=300)
                    rounds += 1
                return rounds

            streams = [asyncio.create_task(stream(n)) for n in ("ca", "cb") * 4]
            try:
                rounds = await asyncio.gather(*(churn(n) for n in sources))
            finally:
                done.set()
                outcome = await asyncio.gather(*streams, return_exceptions=True)
            failures = [r for r in outcome if isinstance(r, BaseException)]
            assert failures == [], failures[:3]
            return results, rounds

    started = time.monotonic()
    results, rounds = asyncio.run(run())
    print(f"churn: {rounds} rounds, {len(results)} requests in {time.monotonic() - started:.1f}s")
    assert rounds == [CHURN_ROUNDS] * len(sources) and len(results) >= 8
    versions = {adapter for adapter, _ in results}
    assert len(versions) >= 4  # the streams really saw the churn
    for adapter, tokens in results:
        assert tokens == expected[adapter], adapter
