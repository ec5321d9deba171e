"""Inductor's compiled artefacts kept under the effllm cache dir, so compile warm-up is paid once per
machine: the FX graph cache (generated kernels by graph), the AOTAutograd cache and the C++/Triton code
cache all live under TORCHINDUCTOR_CACHE_DIR, which defaults to a per-user folder in /tmp (gone at a
reboot or with a fresh container). A second start of the same compiled configuration then loads the
kernels instead of generating and building them; dynamo still traces (seconds), and Inductor keys every
entry on the graph, the torch version and its config, so a stale entry is never used.
Invariant: `persist` runs before anything compiles in this process (the server calls it before it imports
torch; the hf engine again before its warm-up); a TORCHINDUCTOR_* variable the user set is left as it is.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from ...common.model import cache_dir

_COUNTERS = (
    ("inductor", "fxgraph_cache_hit"),
    ("inductor", "fxgraph_cache_miss"),
    ("inductor", "fxgraph_cache_bypass"),
    ("aot_autograd", "autograd_cache_hit"),
    ("aot_autograd", "autograd_cache_miss"),
    ("aot_autograd", "autograd_cache_bypass"),
)


def inductor_dir() -> Path:
    return cache_dir() / "inductor"


def persist() -> Path:
    """Point Inductor's caches at EFFLLM_CACHE/inductor and turn the FX graph and AOTAutograd caches on
    (torch's defaults, made explicit); returns the cache dir in force."""
    current = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    if current is None or current == _torch_default():
        # NOTE: torch writes its own /tmp default into the environment the first time it asks for the dir
        # (torch._inductor.runtime.cache_dir_utils.cache_dir); that value is torch's, not the user's
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(inductor_dir())
    os.environ.setdefault("TORCHINDUCTOR_FX_GRAPH_CACHE", "1")
    os.environ.setdefault("TORCHINDUCTOR_AUTOGRAD_CACHE", "1")
    # NOTE: torch's config modules read these variables when they are imported; when torch came first
    # (a server imports it before its engines start), set the configs themselves too.
    if "torch._inductor.config" in sys.modules:
        import torch._functorch.config as functorch_config
        import torch._inductor.config as inductor_config

        inductor_config.fx_graph_cache = os.environ["TORCHINDUCTOR_FX_GRAPH_CACHE"] == "1"
        functorch_config.enable_autograd_cache = os.environ["TORCHINDUCTOR_AUTOGRAD_CACHE"] == "1"
    return Path(os.environ["TORCHINDUCTOR_CACHE_DIR"])


def _torch_default() -> str | None:
    if "torch" not in sys.modules:
        return None
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir

    return os.path.abspath(default_cache_dir())


def counters() -> dict[str, int]:
    """The caches' hit / miss / bypass counts so far in this process (torch._dynamo.utils.counters)."""
    from torch._dynamo.utils import counters as torch_counters

    return {name: int(torch_counters[group][name]) for group, name in _COUNTERS}


def describe(before: dict[str, int], after: dict[str, int]) -> str:
    """ "fx graph 2 hit 0 miss 0 bypass; aot autograd 2 hit 0 miss 0 bypass" between two counts."""
    d = {k: after[k] - before.get(k, 0) for k in after}
    return (
        f"fx graph {d['fxgraph_cache_hit']} hit {d['fxgraph_cache_miss']} miss "
        f"{d['fxgraph_cache_bypass']} bypass; aot autograd {d['autograd_cache_hit']} hit "
        f"{d['autograd_cache_miss']} miss {d['autograd_cache_bypass']} bypass"
    )
