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
