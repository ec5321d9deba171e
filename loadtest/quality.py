"""Held-out perplexity of a model at a precision: the quality score behind the precision table's MCR.

Runs as its own process (`python -m effllm.loadtest.quality MODEL PRECISION`, prints one JSON line) so
torch/transformers never load into the campaign or Locust processes, and each precision gets a fresh
interpreter. It scores the same weights the server serves with transformers (the reference
implementation), on a fixed built-in text set (`HELD_OUT`, written for this purpose, so no model saw it
in training), token-weighted over the texts.

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

HELD_OUT = (
    "The harbour town woke slowly. Fishing boats came in before dawn, and by seven the market stalls were "
    "full of crates of mackerel, crabs and mussels. The baker on the corner opened his shutters, and the "
    "smell of fresh bread drifted down to the quay, where children waited for the school bus.",
    "To replace a bicycle tyre, first release the brake and remove the wheel. Push the valve into the rim, "
    "then use two tyre levers to lift one side of the tyre over the edge. Pull out the old tube, check the "
    "inside of the tyre for sharp objects, fit the new tube and work the tyre back onto the rim by hand.",
    "Water boils at a lower temperature at high altitude because the air pressure is lower. Climbers who "
    "cook pasta on a mountain therefore need more time, since the water never gets as hot as it would at "
    "sea level. Pressure cookers solve the problem by raising the pressure inside the pot.",
    "The committee met on Tuesday to discuss the new library. Most members agreed that the building should "
    "have a quiet reading room, a children's corner and space for evening classes. The budget, however, "
    "was smaller than expected, so the architects were asked to prepare a simpler design.",
    "A good night's sleep helps memory. During deep sleep the brain replays what happened during the day "
    "and stores the important parts. People who sleep too little often find it harder to concentrate, "
    "and they make more mistakes in tasks that need careful attention.",
    "She opened the old letter carefully. The paper was yellow and the ink had faded, but the handwriting "
    "was still clear. It was from her grandmother, written the summer before the war, describing a long "
    "walk through the hills and a picnic beside a river that no longer exists.",
)


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
