"""Tune -> publish -> serve, end to end over gRPC: `effllm tune --publish` trains a LoRA adapter on a
synthetic task, publishes it into a running server's adapter root and loads it; the next request naming the
adapter gets the new behaviour. A second published version hot-swaps in under the same name."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from effllm.tuner import tasks

from ..serverproc import ServerProcess, start_server, wait_serving

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("effllm.server.adapters") is None,
    reason="AdapterService (server/adapters, the `adapters` branch) is not in this checkout yet",
)

TRAIN = [  # the bench reached 4/4 held-out exact match on json_extract after 4 steps of batch 4 at lr 1e-3
    *("--n-train", "256", "--n-eval", "8", "--batch-size", "4", "--max-steps", "12", "--lr", "1e-3"),
    *("--max-length", "80", "--target-modules", "q_proj,k_proj,v_proj,o_proj", "--eval-max-new-tokens", "28"),
    "--no-progress",
]


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("adapter-root")


@pytest.fixture(scope="module")
def server(root: Path, logs_dir: Path) -> Iterator[ServerProcess]:
    # Not waited for here: the first tuning run overlaps the server's start-up.
    proc = start_server(
        "--engine",
        "vllm",
        "--adapter-root",
        str(root),
        "--max-context",
        "512",
        "--kv-cache-gib",
        "0.25",
        "--max-concurrency",
        "4",
        "--max-adapter-rank",
        "16",
        log_dir=logs_dir,
        wait=False,
    )
    yield proc
    proc.stop()


def tune(task: str, out: Path, server: ServerProcess, root: Path, *extra: str) -> dict[str, object]:
    cmd = [
        sys.executable,
        "-m",
        "effllm.cli.main",
        "tune",
        "--data",
        f"task:{task}",
        "--output-dir",
        str(out),
        "--publish",
        server.target,
        "--name",
        "tuned",
        "--adapter-root",
        str(root),
        *TRAIN,
        *extra,
    ]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads((out / "metrics.json").read_text())  # type: ignore[no-any-return]


def answers(server: ServerProcess, task: str, adapter: str) -> tuple[list[bool], set[str]]:
    _, held = tasks.generate(task, 256, 8, seed=0)  # the same held-out prompts the tuner evaluated
    hits, used = [], set()
    with server.client(timeout=120) as client:
        for record in held:
            user, reference = record["messages"]  # type: ignore[misc]
            reply = client.generate(
                messages=[("user", user["content"])], adapter=adapter, max_new_tokens=32, temperature=0.0
            )
            hits.append(reply.text.strip() == reference["content"])
            used.add(reply.adapter)
    return hits, used


def test_published_adapter_is_served_and_hot_swapped(
    server: ServerProcess, root: Path, tmp_path: Path
) -> None:
    m1 = tune("json_extract", tmp_path / "v1", server, root)
    assert (root / "tuned" / "1" / "adapter_model.safetensors").is_file()
    manifest = json.loads((root / "tuned" / "1" / "manifest.json").read_text())
    assert (manifest["name"], manifest["version"], manifest["method"]) == ("tuned", "1", "lora")
    wait_serving(server, 300)

    base_hits, used = answers(server, "json_extract", "")
    assert used == {""} and sum(base_hits) <= 2
    v1_hits, used = answers(server, "json_extract", "tuned")
    assert used == {"tuned@1"}
    assert sum(v1_hits) >= 5, (v1_hits, m1["eval_after"])

    # A second version under the same name (another seed: other weights): the next request naming "tuned"
    # gets it. (In-flight requests staying on v1 during a swap is tested in test_adapters_e2e.)
    tune("json_extract", tmp_path / "v2", server, root, "--seed", "1")
    v1_bytes = (root / "tuned" / "1" / "adapter_model.safetensors").read_bytes()
    assert (root / "tuned" / "2" / "adapter_model.safetensors").read_bytes() != v1_bytes
    v2_hits, used = answers(server, "json_extract", "tuned")
    assert used == {"tuned@2"} and sum(v2_hits) >= 5, v2_hits
    still_v1, used = answers(server, "json_extract", "tuned@1")
    assert used == {"tuned@1"} and still_v1 == v1_hits
    with server.client() as client:
        listed = {(a.name, a.version): a for a in client.list_adapters()}
    assert listed[("tuned", "2")].latest and not listed[("tuned", "1")].latest
