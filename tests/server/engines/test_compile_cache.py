"""Inductor's caches under the effllm cache dir (server/engines/compile_cache.py)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from effllm.server.engines import compile_cache


def test_caches_go_under_the_effllm_cache_dir_unless_the_user_set_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import torch._functorch.config as functorch_config
    import torch._inductor.config as inductor_config
    from torch._inductor.runtime.cache_dir_utils import cache_dir, default_cache_dir

    monkeypatch.setenv("EFFLLM_CACHE", str(tmp_path))
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
    monkeypatch.setattr(inductor_config, "fx_graph_cache", False)
    monkeypatch.setattr(functorch_config, "enable_autograd_cache", False)
    for name in ("TORCHINDUCTOR_FX_GRAPH_CACHE", "TORCHINDUCTOR_AUTOGRAD_CACHE"):
        monkeypatch.delenv(name, raising=False)
    cache_dir()  # torch asked first: it wrote its own /tmp default into the environment
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == os.path.abspath(default_cache_dir())
    assert compile_cache.persist() == tmp_path / "inductor" == Path(cache_dir())
    assert inductor_config.fx_graph_cache and functorch_config.enable_autograd_cache

    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "mine"))
    assert compile_cache.persist() == tmp_path / "mine"


def test_counters_and_their_description() -> None:
    before = compile_cache.counters()
    assert set(before) >= {"fxgraph_cache_hit", "autograd_cache_miss"}
    after = {**before, "fxgraph_cache_hit": before["fxgraph_cache_hit"] + 2}
    assert compile_cache.describe(before, after).startswith(
        "fx graph 2 hit 0 miss 0 bypass; aot autograd 0 hit"
    )
