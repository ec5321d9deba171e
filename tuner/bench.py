"""PEFT benchmark: every tuning method on the same task, model, steps and seed -> a table and JSON.

The EfficientLLM study's §5.4 comparison on our model: trainable params, peak memory and AMU, step latency
(AL), samples/s, energy (with its source), held-out metric before -> after. The LoRA row is also run through
plain PEFT + the HF Trainer on the same config, and the table gives our loop's samples/s over the Trainer's.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from .config import TuneConfig


def bench_config(method: str, task: str, steps: int, overrides: list[str]) -> TuneConfig:
    raw: dict[str, Any] = {
        "method": method,
        "data": f"task:{task}",
        "max_steps": steps,
        "n_train": 256,
        "n_eval": 32,
        "max_length": 96,
        "batch_size": 8,
        "seed": 0,
        "schedule": "linear",
    }
    # One lr does not suit every method: full and freeze move all of a layer's weights at once.
    raw["lr"] = {"full": 2e-5, "freeze": 1e-4}.get(method, 1e-3)
    raw["target_modules"] = ("q_proj", "k_proj", "v_proj", "o_proj")
    for item in overrides:
        key, _, value = item.partition("=")
        raw[key] = value
    return TuneConfig.from_dict(raw)


def run_method(config: TuneConfig) -> dict[str, Any]:
    from .train import run

    return run(config, progress_bar=False).metrics


def run_hf_trainer(config: TuneConfig) -> dict[str, Any]:
    """Plain PEFT + transformers.Trainer on the LoRA config; samples/s over the summed step times."""
    import tempfile

    import torch
    from peft import get_peft_model
    from transformers import Trainer, TrainerCallback, TrainingArguments

    from . import data, methods
    from .train import collate, load_base

    torch.manual_seed(config.seed)
    dataset = data.load_dataset(config.data, n_train=config.n_train, n_eval=0, seed=config.seed)
    _, tokenizer, base = load_base(config)
    encoded = data.encode_all(data.Encoder(tokenizer, config.max_length), dataset.train, "bench")
    model = get_peft_model(base, methods.lora_config(config))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    times: list[float] = []

    class StepTimer(TrainerCallback):
        def on_step_begin(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            self.t0 = time.perf_counter()

        def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            times.append(time.perf_counter() - self.t0)

    with tempfile.TemporaryDirectory() as tmp:
        args = TrainingArguments(
            output_dir=tmp,
            per_device_train_batch_size=config.batch_size,
            gradient_accumulation_steps=config.grad_accum,
            max_steps=config.max_steps,
            learning_rate=config.lr,
            lr_scheduler_type="linear",
            warmup_steps=config.warmup_steps,
            weight_decay=config.weight_decay,
            max_grad_norm=config.max_grad_norm,
            seed=config.seed,
            save_strategy="no",
            report_to=[],
            logging_steps=max(1, config.max_steps),
            use_cpu=not torch.cuda.is_available(),
            dataloader_num_workers=0,
            disable_tqdm=True,
        )
        trainer = Trainer(
            model=model,
            args=args,
            train_dataset=encoded,
            data_collator=lambda b: collate(b, pad, torch.device("cpu")),
            callbacks=[StepTimer()],
        )
        result = trainer.train()
    samples = config.max_steps * config.batch_size * config.grad_accum
    return {
        "method": "lora (PEFT + HF Trainer)",
        "samples_per_s": samples / sum(times),
        "step_latency_s": sum(times) / len(times),
        "train_loss": result.training_loss,
        "trainer_samples_per_s": result.metrics.get("train_samples_per_second"),
    }


def _f(x: float | None, fmt: str = ".3f") -> str:
    return "-" if x is None else format(x, fmt)


def table(rows: list[dict[str, Any]], trainer: dict[str, Any] | None) -> str:
    head = (
        "| method | trainable params | peak mem GB | AMU GB | step latency s | samples/s | tokens/s "
        "| samples/param/s | PCU | energy J (source) | mean W | train loss first→last "
        "| held-out loss before→after | exact match before→after |"
    )
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for m in rows:
        b, a = m.get("eval_before") or {}, m.get("eval_after") or {}
        lines.append(
            f"| {m['method']} | {m['params']['trainable']:,} ({m['params']['trainable_percent']:.2f} %) "
            f"| {m['memory']['peak_gb']:.2f} | {m['memory']['amu_gb']:.2f} | {m['step_latency_s']:.3f} "
            f"| {m['samples_per_s']:.2f} | {m['tokens_per_s']:.0f} | {m['samples_per_param_s']:.2e} "
            f"| {m['pcu']:.2f} | {m['energy']['joules']:.0f} ({m['energy']['source']}) "
            f"| {m['energy']['mean_power_w']:.1f} | {m['train_loss'][0]:.3f}→{m['train_loss'][-1]:.3f} "
            f"| {_f(b.get('loss'))}→{_f(a.get('loss'))} | {_f(b.get('exact_match'), '.2f')}→"
            f"{_f(a.get('exact_match'), '.2f')} |"
        )
    if trainer is not None:
        ours = next((m for m in rows if m["method"] == "lora"), None)
        ratio = (
            f"; ours/Trainer samples/s = {ours['samples_per_s'] / trainer['samples_per_s']:.2f}"
            if ours
            else ""
        )
        lines.append("")
        lines.append(
            f"PEFT + HF Trainer, LoRA config: {trainer['samples_per_s']:.2f} samples/s, step latency "
            f"{trainer['step_latency_s']:.3f} s, mean train loss {trainer['train_loss']:.3f}{ratio}"
        )
    return "\n".join(lines)


def main(
    *, steps: int, task: str, methods: list[str], hf_trainer: bool, out: str, overrides: list[str]
) -> int:
    """Runs one method at a time and rewrites the JSON after each, so a long run leaves what it measured."""
    rows: list[dict[str, Any]] = []
    trainer: dict[str, Any] | None = None
    configs = [bench_config(m, task, steps, overrides) for m in methods]
    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)

    def write() -> str:
        text = table(rows, trainer)
        path.write_text(
            json.dumps(
                {
                    "task": task,
                    "steps": steps,
                    "configs": [c.to_dict() for c in configs],
                    "runs": rows,
                    "hf_trainer": trainer,
                    "table": text,
                },
                indent=2,
            )
            + "\n"
        )
        return text

    for config in configs:
        print(f"== {config.method}: {steps} steps on task:{task}", flush=True)
        rows.append(run_method(config))
        write()
        if config.method == "lora" and hf_trainer:
            # Right after our LoRA row, on the same config, so the ratio compares like with like.
            print("== lora through PEFT + HF Trainer", flush=True)
            trainer = run_hf_trainer(config)
            write()
    print(write())
    print(f"wrote {path}")
    return 0
