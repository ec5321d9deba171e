"""The architecture family on the vLLM engine (issue 24): one real server hosting every family member the
vLLM engine runs on this CPU (bf16, since vLLM runs MLA in bf16 only), each generating exactly N tokens alone
and four at a time; the members it cannot run are the ones engine_support refuses, with the way out.
Random-init weights: token counts, never text."""

from __future__ import annotations

import json
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from effllm.common.architecture import engine_support
from effllm.common.family import MEMBERS, Shape, make_family
from effllm.common.model import resolve_model

from ..serverproc import ServerProcess, start_server

pytestmark = [pytest.mark.model, pytest.mark.timeout(1800)]
N = 5


@pytest.fixture(scope="module")
def family(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return make_family(tmp_path_factory.mktemp("family"), resolve_model(None).path, Shape(layers=2))


def _supported(family: dict[str, Path]) -> dict[str, Path]:
    out = {}
    for member, path in family.items():
        ok, _ = engine_support("vllm", json.loads((path / "config.json").read_text()), precision="bf16")
        if ok:
            out[member] = path
    return out


@pytest.fixture(scope="module")
def server(family: dict[str, Path], logs_dir: Path) -> Iterator[ServerProcess]:
    models = [x for m, p in _supported(family).items() for x in ("--model", f"{m}={p}")]
    proc = start_server(
        *models,
        "--engine", "vllm", "--precision", "bf16", "--max-concurrency", "4", "--max-context", "256",
        "--kv-cache-gib", "0.1", "--no-telemetry",
        log_dir=logs_dir,
        ready_timeout=1200,  # one vLLM engine core per member, started one after another
    )  # fmt: skip
    yield proc
    assert proc.stop() == 0


def test_vllm_runs_the_attention_moe_and_mamba2_members_and_refuses_the_others(
    family: dict[str, Path],
) -> None:
    runs = _supported(family)
    assert set(runs) == {"mha", "gqa", "mqa", "mla", "moe", "mamba2", "gpt-neox"}
    refused = {m: engine_support("vllm", json.loads((family[m] / "config.json").read_text()))[1]
               for m in set(MEMBERS) - set(runs)}  # fmt: skip
    assert "no RWKV" in refused["rwkv"] and "--engine hf" in refused["rwkv"]
    assert "Mamba-1" in refused["mamba"] and "--engine hf" in refused["mamba"]


def test_each_member_generates_exactly_n_tokens_alone_and_four_at_a_time(
    server: ServerProcess, family: dict[str, Path]
) -> None:
    members = list(_supported(family))
    with server.client(timeout=300) as client:
        assert [m.name for m in client.list_models()] == members
        for member in members:

            def one(i: int, member: str = member) -> int:
                reply = client.generate(
                    f"Tell me about the sea, part {i}.",
                    model=member, max_new_tokens=N, temperature=0.0, ignore_eos=True,
                )  # fmt: skip
                assert reply.model == member
                return int(reply.usage.output_tokens)

            assert one(0) == N, member
            with ThreadPoolExecutor(4) as pool:
                assert list(pool.map(one, range(4))) == [N] * 4, member
