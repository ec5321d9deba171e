"""The committed stubs in api/v1 are exactly what the .proto sources generate."""

from __future__ import annotations

from pathlib import Path

from effllm.api import codegen


def test_stubs_match_protos(tmp_path: Path) -> None:
    written = codegen.generate(tmp_path)
    assert written, "no .proto found"
    for fresh in written:
        committed = codegen.STUB_DIR / fresh.name
        assert committed.exists(), f"{fresh.name} is not committed: run python -m effllm.api.codegen"
        assert committed.read_text() == fresh.read_text(), (
            f"{fresh.name} is stale: run python -m effllm.api.codegen"
        )
    generated = {p.name for p in written}
    stale = {p.name for p in codegen.STUB_DIR.glob("*_pb2*.py*")} - generated
    assert not stale, f"stubs without a .proto: {stale}"


def test_messages_pickle_and_unpickle_in_a_fresh_process() -> None:
    """Ray and multiprocessing pickle requests: every message class must name a module that exists.
    The bytes are unpickled in a fresh interpreter that has imported nothing of ours."""
    import pickle
    import subprocess
    import sys

    from effllm.api.v1 import adapters_pb2, generation_pb2, tuning_pb2

    messages = [
        generation_pb2.GenerateRequest(prompt="hi", objective=generation_pb2.OBJECTIVE_ENERGY),
        adapters_pb2.LoadAdapterRequest(name="a"),
        tuning_pb2.SubmitJobRequest(),
    ]
    for m in messages:
        assert type(m).__module__.startswith("effllm.api.v1."), type(m).__module__
    code = "import pickle, sys\nprint([type(m).__name__ for m in pickle.loads(sys.stdin.buffer.read())])"
    out = subprocess.run(
        [sys.executable, "-c", code], input=pickle.dumps(messages), capture_output=True, timeout=60
    )
    assert out.returncode == 0, out.stderr.decode()
    assert out.stdout.decode().strip() == str([type(m).__name__ for m in messages])
