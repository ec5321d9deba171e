"""Where an hf-engine decode step goes: the bare model, the Batch step, PEFT's mixed-adapter forward, DoRA.

Each case decodes ROWS rows for STEPS steps after a warm-up and prints ms/step; then torch.profiler lists the
ops that took the most host time in the mixed LoRA+DoRA case. With --tiny the model keeps its 30 layers and
vocabulary but is 64 wide, so compute is negligible and what is left is per-step host overhead. With
--compiled, the compiled decode path (hf_compiled, what `effllm serve --compile-decode` runs) is timed too,
base rows and base+LoRA rows, after its compile warm-up, whose seconds it reports.

    python bench/hf_step.py [--device cuda] [--tiny] [--precision bf16] [--compiled]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch


def model_dir(tmp: Path, tiny: bool, source: Path | None) -> Path:
    import shutil

    from transformers import AutoConfig, AutoModelForCausalLM

    if source is None:
        from effllm.common.model import resolve_model

        source = resolve_model(None).path
    if not tiny and any(source.glob("*.safetensors")):
        return source
    cfg = AutoConfig.from_pretrained(source)  # tiny, or a config without weights: random weights
    if tiny:
        cfg.hidden_size, cfg.intermediate_size, cfg.head_dim = 64, 128, 16
        cfg.num_attention_heads, cfg.num_key_value_heads = 4, 2
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(tmp / "m")
    for f in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        if (source / f).is_file():
            shutil.copy(source / f, tmp / "m" / f)
    return tmp / "m"


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed(device: str, fn: Any, steps: int) -> float:
    for _ in range(3):
        fn()
    sync(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        fn()
    sync(device)
    return 1e3 * (time.perf_counter() - t0) / steps


def count_launches(device: str, model: Any, nxt: torch.Tensor, cache: Any) -> int:
    from torch.profiler import ProfilerActivity, profile

    if not device.startswith("cuda"):
        return 0
    with torch.inference_mode(), profile(activities=[ProfilerActivity.CUDA]) as prof:
        model(input_ids=nxt, past_key_values=cache, use_cache=True, logits_to_keep=1)
        torch.cuda.synchronize()
    try:
        return sum(e.count for e in prof.key_averages() if str(e.device_type).endswith("CUDA"))
    except Exception:  # a profiler API change must not cost the timings
        return -1


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--precision", default="bf16", choices=("fp32", "bf16", "fp16"))
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--model", type=Path, default=None)
    ap.add_argument("--rows", type=int, default=8)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument(
        "--compiled",
        action="store_true",
        help="also time Batch.step with the compiled decode path (hf_compiled, as --compile-decode)",
    )
    ap.add_argument("--cudnn-sdp", action="store_true", help="keep cuDNN attention (the engine turns it off)")
    args = ap.parse_args()
    if not args.cudnn_sdp:
        from effllm.server.engines.hf_engine import avoid_cudnn_attention

        avoid_cudnn_attention(args.device)

    from transformers import AutoModelForCausalLM, AutoTokenizer, DynamicCache

    from effllm.server.engines.base import AdapterSpec, Sampling
    from effllm.server.engines.hf_batch import Batch
    from effllm.server.engines.hf_decoder import Row
    from effllm.server.engines.hf_text import TextStream
    from effllm.tuner.synthetic import make_adapter

    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[args.precision]
    tmp = Path(tempfile.mkdtemp())
    path = model_dir(tmp, args.tiny, args.model)
    tok = AutoTokenizer.from_pretrained(path)
    model: Any = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(args.device).eval()
    results: dict[str, float] = {}
    if args.device.startswith("cuda"):  # the floor any eager step pays: one launch, one host sync
        x = torch.zeros(16, device=args.device)
        results["one tiny kernel launch"] = timed(args.device, lambda: x.add_(1), 2000)
        results["launch + host sync (.item())"] = timed(args.device, lambda: x.add_(1).sum().item(), 500)

    # 1. the bare model: B rows, one token each, on a growing cache
    ids = torch.randint(0, 1000, (args.rows, 16), device=args.device)
    with torch.inference_mode():
        cache = DynamicCache(config=model.config)
        model(input_ids=ids, past_key_values=cache, use_cache=True)
        nxt = ids[:, -1:]
        results["bare model forward"] = timed(
            args.device,
            lambda: model(input_ids=nxt, past_key_values=cache, use_cache=True, logits_to_keep=1),
            args.steps,
        )

    # 2-4. the engine's Batch
    specs = {}
    for name, method in (("lora", "lora"), ("dora", "dora")):
        p = make_adapter(path, tmp / name / "1", method=method, rank=8, seed=1)
        specs[name] = AdapterSpec(name, "1", p, method, 8, 16.0, ("q_proj", "v_proj"))  # type: ignore[arg-type]

    def rows(adapters: list[AdapterSpec | None]) -> list[Row]:
        out = []
        for i, a in enumerate(adapters):
            prompt = tok.encode(f"Request {i}: write a short story about the sea.")
            s = Sampling(max_new_tokens=10_000, temperature=0.0)
            out.append(Row(f"r{i}", prompt, s, a, TextStream(tok, prompt, ()), torch.Generator()))
        return out

    def batch_case(
        label: str,
        adapters: list[AdapterSpec | None],
        load: list[str],
        profile_it: bool = False,
        compiled: bool = False,
    ) -> None:
        batch = Batch(model, set(), args.device)
        t0 = time.perf_counter()
        decoder = None
        if compiled:  # as the engine does with compile_decode: warm-up, then the adapters (re-warm)
            from effllm.server.engines.hf_compiled import CompiledDecoder

            max_len = 128 + args.steps  # prompt + the steps timed below
            decoder = CompiledDecoder(model, batch.stack, args.device, len(adapters), max_len)
            decoder.warm_up()
            batch.use(decoder)
        for name in load:
            batch.add_adapter(specs[name])
        if decoder is not None:
            warm[label] = (time.perf_counter() - t0, decoder.graphs, decoder.mode)
        batch.step([], [])
        batch.step(rows(adapters), [])
        results[label] = timed(args.device, lambda: batch.step([], []), args.steps)
        if profile_it:
            from torch.profiler import ProfilerActivity, profile

            acts = [ProfilerActivity.CPU]
            if args.device.startswith("cuda"):
                acts.append(ProfilerActivity.CUDA)
            with profile(activities=acts) as prof:
                for _ in range(5):
                    batch.step([], [])
                sync(args.device)
            print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=18), flush=True)
        if batch.peft is not None:
            for key in list(batch.adapters):
                batch.remove_adapter(key)

    warm: dict[str, tuple[float, int, str]] = {}  # compiled cases: warm-up seconds, graphs, mode
    n = args.rows
    launches = count_launches(args.device, model, nxt, cache)
    batch_case("Batch.step base rows, no adapters", [None] * n, [])
    batch_case(
        "Batch.step base+lora (1 group)", [None if i % 2 else specs["lora"] for i in range(n)], ["lora"]
    )
    if args.compiled:  # before the DoRA case: PEFT then wraps the Linears the compiled step reads
        batch_case("compiled: base rows, no adapters", [None] * n, [], compiled=True)
        batch_case(
            "compiled: base+lora (1 group)",
            [None if i % 2 else specs["lora"] for i in range(n)],
            ["lora"],
            compiled=True,
        )
    batch_case(
        "Batch.step base+lora+dora (2 groups)",
        [(None, specs["lora"], specs["dora"])[i % 3] for i in range(n)],
        ["lora", "dora"],
        profile_it=True,
    )
    width = max(map(len, results))
    sdp = "cuDNN attention on" if args.cudnn_sdp else "cuDNN attention off (as the engine runs)"
    print(f"\n{args.device} {args.precision} {'tiny' if args.tiny else path.name}, {n} rows; {sdp}")
    print(f"kernels launched per base step (profiler): {launches}")
    for k, v in results.items():
        print(f"{k:<{width}}  {v:8.2f} ms/step")
    for k, (seconds, graphs, mode) in warm.items():
        print(f"{k}: warm-up {seconds:.1f} s, {graphs} graphs compiled, step runs {mode}")
    if args.out:
        out = {"device": args.device, "tiny": args.tiny, "ms_per_step": results, "compiled_warmup": warm}
        args.out.write_text(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
