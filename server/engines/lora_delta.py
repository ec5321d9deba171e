"""The vLLM engine's adapter probe: each adapted module's LoRA update on a probe input, computed in this
process from the snapshot's weights, in milliseconds and without a request through the engine core.

Why not a forward: on vLLM's CPU backend one step of the served model costs 50-100 ms (its worker runs one
torch thread), so a probe request alone was over the LoadAdapter budget (issue 28). What the forward probe
caught once the registry's scan has refused NaN/inf weights is finite weights whose product overflows
(tests/e2e/test_adapter_hardening.py: every weight 1e30), and that is what this check sees: the update
`scale * B @ (A @ x)` of every module on a fixed input `x` of unit RMS (what a pre-norm block feeds its
projections), computed in fp32 and cast to the engine's dtype, must be finite and at most DELTA_LIMIT.

Invariant: reads only the file it is given (the registry's private snapshot, already scanned); keeps no state
but the fixed probe inputs.
"""

from __future__ import annotations

import functools
import math
from pathlib import Path

import torch

from .base import AdapterMethod

# Largest |update| on a unit-RMS input an adapter may have. The synthetic adapters the tests and benches
# serve (tuner/synthetic.py: random A and B, scale 1.0, alpha = 2r, every projection) peak at 3.4 for
# r = 8, 16 and 64 on SmolLM2-135M; trained ones are smaller still. An update 1e4 times its input is a
# broken adapter, and a few such modules in a row (gate x up, then down) push the residual stream
# towards fp32's limit (x**2 in RMSNorm overflows from 1.8e19).
DELTA_LIMIT = 1e4
_PREFIX = "base_model.model."
_A, _B = ".lora_A.weight", ".lora_B.weight"


def lora_scale(method: AdapterMethod, rank: int, alpha: float) -> float:
    """PEFT's scaling: alpha / r, or alpha / sqrt(r) for rsLoRA."""
    return alpha / math.sqrt(rank) if method == "rslora" else alpha / rank


@functools.cache
def probe_input(features: int) -> torch.Tensor:
    """A fixed fp32 vector [features] of unit RMS (seeded: the same input for every load; read-only)."""
    x = torch.randn(features, generator=torch.Generator().manual_seed(features), dtype=torch.float32)
    return x / x.pow(2).mean().sqrt()


def delta_problem(path: Path, scale: float, dtype: torch.dtype, limit: float = DELTA_LIMIT) -> str:
    """'' when every module's update on the probe input is finite in `dtype` and at most `limit`; else
    what is wrong, naming the first module that fails. `path`: a PEFT folder (adapter_model.safetensors)."""
    from safetensors import safe_open

    try:
        with safe_open(str(path / "adapter_model.safetensors"), framework="pt", device="cpu") as f:
            keys = set(f.keys())
            modules = sorted(k[: -len(_A)] for k in keys if k.endswith(_A) and k[: -len(_A)] + _B in keys)
            for module in modules:
                a = f.get_tensor(module + _A).to(torch.float32)  # [r, in]
                b = f.get_tensor(module + _B).to(torch.float32)  # [out, r]
                if a.dim() != 2 or b.dim() != 2 or a.shape[0] != b.shape[1]:
                    continue  # not a Linear's pair (the registry's shape check owns these)
                # elementwise products, not matmuls: matrix-vector products this small are cheaper
                # without a BLAS call (whose first call per shape costs more than the whole check)
                xa = (a * probe_input(a.shape[1])).sum(-1)  # [r]
                delta = (b * xa).sum(-1) * scale  # [out]
                peak = float(delta.to(dtype).abs().max()) if delta.numel() else 0.0
                name = module.removeprefix(_PREFIX)
                if not math.isfinite(peak):
                    return f"its update of {name} on a probe input is not finite (inf or NaN) in {dtype}"
                if peak > limit:
                    return (
                        f"its update of {name} on a probe input of unit RMS reaches {peak:.3g}, over the "
                        f"limit {limit:.0e} (an update that large drives the logits towards overflow)"
                    )
    except Exception as exc:  # the registry's scan read this file already: unexpected, still the adapter's
        return f"its weights cannot be read ({type(exc).__name__}: {str(exc)[:120]})"
    return ""
