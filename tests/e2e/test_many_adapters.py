"""Many adapters at once (issue 12): 64 distinct adapters with Zipf popularity plus base rows over 32
concurrent streams, on the vLLM engine with --max-adapters-per-batch 8 (more distinct adapters than the
worker has slots: later ones must wait their turn, never crash the engine core) and on the hf engine
(stacked LoRA). Zero failed requests, the server SERVING after, and a sample of rows (base, and of
each adapter kind the most and the least requested adapter) equal to PEFT run alone (greedy)."""

from __future__ import annotations

import asyncio
import random
from typing import Any

import pytest

from effllm.client import AsyncEffllmClient

from ..serverproc import ServerProcess
from .conftest import ManyAdapters

pytestmark = pytest.mark.timeout(1800)

PROMPTS = ("The capital of France is", "def fibonacci(n):", "Once upon a time,")
NEW = 4  # greedy tokens per request: parity needs a few, the traffic and PEFT pay for each
REQUESTS = 128
STREAMS = 32
BASE_SHARE = 0.15


@pytest.fixture(scope="session")
def peft_one_by_one(many_adapters: ManyAdapters) -> Any:
    """PEFT, one adapter and one request at a time (greedy), cached per (prompt, adapter)."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from effllm.common.model import resolve_model

    path = resolve_model(None).path
    tok = AutoTokenizer.from_pretrained(path)
    base = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    cache: dict[tuple[str, str], list[int]] = {}

    def run(prompt: str, name: str) -> list[int]:
        if (prompt, name) not in cache:
            ids = torch.tensor([tok.encode(prompt)])
            kw: dict[str, Any] = dict(max_new_tokens=NEW, do_sample=False, pad_token_id=tok.eos_token_id)
            with torch.inference_mode():
                if name:
                    model = PeftModel.from_pretrained(base, str(many_adapters.root / name / "1"))
                    out = model.generate(input_ids=ids, **kw)
                    model.unload()
                else:
                    out = base.generate(input_ids=ids, **kw)
            cache[(prompt, name)] = out[0, ids.shape[1] :].tolist()
        return cache[(prompt, name)]

    return run


def zipf_traffic(names: list[str], n: int, seed: int = 0) -> list[str]:
    """Adapter per request: base with BASE_SHARE, else Zipf(1) over `names`; every adapter at least once."""
    rng = random.Random(seed)
    weights = [1.0 / (i + 1) for i in range(len(names))]
    picks = [""] * round(n * BASE_SHARE) + list(names)
    picks += rng.choices(names, weights=weights, k=n - len(picks))
    rng.shuffle(picks)
    return picks


async def _drive(target: str, traffic: list[str]) -> list[Any]:
    """STREAMS closed-loop workers; a failed request is kept as its exception."""
    results: list[Any] = [None] * len(traffic)
    queue = list(enumerate(traffic))
    async with AsyncEffllmClient(target, timeout=900.0) as ac:

        async def worker() -> None:
            while queue:
                i, name = queue.pop(0)
                try:
                    results[i] = await ac.generate(
                        PROMPTS[i % len(PROMPTS)],
                        adapter=f"{name}@1" if name else "",
                        max_new_tokens=NEW,
                        temperature=0.0,
                        ignore_eos=True,
                    )
                except Exception as exc:  # counted below: the test wants zero of these
                    results[i] = exc

        await asyncio.gather(*(worker() for _ in range(STREAMS)))
    return results


@pytest.mark.parametrize("engine", ["vllm", "hf"])
def test_64_adapters_zipf_plus_base_on_32_streams(
    engine: str, request: pytest.FixtureRequest, many_adapters: ManyAdapters, peft_one_by_one: Any
) -> None:
    server: ServerProcess = request.getfixturevalue(f"{engine}_many_server")
    names = [name for name, _, _ in many_adapters.adapters]
    with server.client(timeout=600.0) as c:
        for name in names:
            c.load_adapter(name, "1")
        assert len(c.list_adapters()) == len(names)
        assert c.model_info().capabilities.max_adapters_per_batch == 8
    traffic = zipf_traffic(names, REQUESTS)
    results = asyncio.run(_drive(server.target, traffic))
    failed = [(traffic[i], r) for i, r in enumerate(results) if isinstance(r, BaseException)]
    assert not failed, failed[:3]
    assert all(r.usage.output_tokens == NEW for r in results)
    assert server.proc.poll() is None
    with server.client(timeout=60.0) as c:
        assert c.health() == "SERVING"
        stats = c.stats()
        assert stats.running == 0 and stats.queued == 0
    # Against PEFT run alone: a base row, and of each kind (LoRA/rsLoRA x r8/r16; names cycle through the
    # four kinds, Zipf weight falls with the index) the most and the least requested adapter. Every
    # adapter would be 65 PEFT loads, most of this test's CI time.
    sample = {"", *names[:4], *names[-4:]}
    checked: set[str] = set()
    for i, name in enumerate(traffic):
        if name in checked or name not in sample:
            continue
        checked.add(name)
        reply = results[i]
        assert reply.adapter == (f"{name}@1" if name else "")
        want = peft_one_by_one(PROMPTS[i % len(PROMPTS)], name)
        assert list(reply.token_ids) == want, f"{engine}: {name or 'base'} row {i} differs from PEFT"
    assert checked == sample


def test_engine_core_death_turns_health_not_serving(vllm_many_server: ServerProcess) -> None:
    """The watchdog: if vLLM's engine core dies anyway (here: killed), health says NOT_SERVING at once and
    the server exits with ENGINE_DIED_EXIT for its supervisor. Runs last on this module's vLLM server."""
    import time

    import psutil

    from effllm.server.app import ENGINE_DIED_EXIT

    server = vllm_many_server
    cores = [
        p
        for p in psutil.Process(server.proc.pid).children(recursive=True)
        if "EngineCore" in " ".join(p.cmdline())
    ]
    assert cores, "no vLLM engine core process under the server"
    cores[0].kill()
    seen = []
    deadline = time.monotonic() + 60
    while server.proc.poll() is None and time.monotonic() < deadline:
        try:
            with server.client(timeout=2.0) as c:
                seen.append(c.health())
        except Exception:  # the port closes once the server stops
            pass
        time.sleep(0.2)
    assert server.proc.wait(timeout=60) == ENGINE_DIED_EXIT
    # Health turns NOT_SERVING just before the process exits: a 0.2 s poll may or may not see that moment,
    # so the exit code and the server's own line are the proof; a poll may only ever see SERVING before it.
    assert set(seen) <= {"SERVING", "NOT_SERVING"}
    assert "engine died: health NOT_SERVING" in server.log()
