"""Held-out perplexity of a model at a precision: the quality score behind the precision table's MCR.

Runs as its own process (`python -m effllm.loadtest.quality MODEL PRECISION`, prints one JSON line) so
torch/transformers never load into the campaign or Locust processes, and each precision gets a fresh
interpreter. It scores the same weights the server serves with transformers (the reference
implementation), on a fixed built-in text set (`HELD_OUT`, written for this purpose, so no model saw it
in training; it lives in common/heldout.py, which the server's own per-variant quality figure
shares), token-weighted over the texts.

Precisions: fp32 / bf16 / fp16 load the checkpoint in that dtype. int4 uses bitsandbytes NF4 when it can
run here; otherwise it simulates weight-only int4 — round-to-nearest, asymmetric, groups of 64 along
each linear layer's input dimension, dequantised back to fp32 — and says so in `method` (a quality
estimate for int4 weights, not the server's kernel).
"""

from __future__ import annotations

import json
import math
import sys
import time
from typing import Any

from ..common.heldout import HELD_OUT

__all__ = ["HELD_OUT", "load", "perplexity"]


def _fake_int4(model: Any, group: int = 64) -> None:
    """In place: every nn.Linear weight (out, in) -> RTN 4-bit per group of `group` input columns."""
    import torch

    with torch.no_grad():
        for mod in model.modules():
            if isinstance(mod, torch.nn.Linear) and mod.weight.shape[1] % group == 0:
                w = mod.weight.data.float()
                g = w.reshape(w.shape[0], -1, group)  # (out, in/group, group)
                lo, hi = g.amin(-1, keepdim=True), g.amax(-1, keepdim=True)
                scale = (hi - lo).clamp(min=1e-8) / 15.0
                q = ((g - lo) / scale).round().clamp(0, 15)
                mod.weight.data = (q * scale + lo).reshape_as(w).to(mod.weight.dtype)


def load(model_path: str, precision: str) -> tuple[Any, Any, str]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_path)
    dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
    if precision in dtypes:
        model = AutoModelForCausalLM.from_pretrained(model_path, dtype=dtypes[precision])
        return model.eval(), tok, precision
    if precision != "int4":
        raise ValueError(f"precision {precision!r}: use fp32, bf16, fp16 or int4")
    try:
        from transformers import BitsAndBytesConfig

        q = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32
        )
        model = AutoModelForCausalLM.from_pretrained(model_path, quantization_config=q)
        return model.eval(), tok, "int4(bitsandbytes-nf4)"
    except Exception:  # no bitsandbytes backend here: simulate the weights' rounding instead
        model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
        _fake_int4(model)
        return model.eval(), tok, "int4(rtn-g64 simulated)"


def perplexity(model_path: str, precision: str) -> dict[str, Any]:
    import torch

    t0 = time.perf_counter()
    model, tok, method = load(model_path, precision)
    nll, count = 0.0, 0
    with torch.no_grad():
        for text in HELD_OUT:
            ids = tok(text, return_tensors="pt").input_ids
            out = model(input_ids=ids, labels=ids)
            n = ids.shape[1] - 1  # labels are shifted inside the model: n predicted tokens
            nll += float(out.loss) * n
            count += n
    return {
        "precision": precision,
        "method": method,
        "perplexity": math.exp(nll / count),
        "tokens": count,
        "texts": len(HELD_OUT),
        "seconds": time.perf_counter() - t0,
    }


def default_model_path() -> str:
    """Where `effllm serve` keeps its embedded default model (the layout common/model.py owns)."""
    from ..common.model import default_checkpoint_dir

    return str(default_checkpoint_dir())


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 2:
        print("usage: python -m effllm.loadtest.quality MODEL_PATH PRECISION", file=sys.stderr)
        return 2
    print(json.dumps(perplexity(args[0], args[1])))
    return 0


if __name__ == "__main__":
    sys.exit(main())
