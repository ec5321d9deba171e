"""One side of a bench pair in its own process: our loop, PEFT + HF Trainer, or the base model's eval.

`python bench/_tuning_run.py SPEC_JSON` prints `BENCH_RESULT {json}` as its last line. A process per
run makes each peak RSS its own (getrusage high-water of this process: loading, training and eval alike,
the same work on both sides) and keeps one run's allocator state and thread pools from the next.
The HF side trains on exactly our micro-batches: the batches our loop would draw (train.micro_batches with
the same seed) are handed to the Trainer in order, one dataset item per micro-batch, through the same
collate; the optimizer and schedule come from methods.build_optimizer/build_scheduler, so the
hyperparameters are one object, not two lists kept in step. Its step time runs from one on_step_end to the
next, so it includes fetching and collating as ours does.
Invariant: both sides report `tokens` (real, non-pad tokens trained on) and `target_tokens` counted from the
batches that really went through the model; the comparison in tuning.py trusts nothing else.
"""

from __future__ import annotations

import itertools
import json
import math
import resource
import statistics
import sys
import time
from typing import Any

import torch
from _harness import load_average

from effllm.tuner.config import TuneConfig


def _peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9  # ru_maxrss: KiB on Linux


def _summary(m: dict[str, Any], step_times: list[float]) -> dict[str, Any]:
    return {
        "tokens": m["tokens"],
        "target_tokens": m["target_tokens"],
        "samples": m["samples"],
        "steps": len(step_times),
        "train_time_s": sum(step_times),
        "tokens_per_s": m["tokens"] / sum(step_times),
        "step_latency_p50_s": statistics.median(step_times),
        "first_step_s": step_times[0],
        "train_loss": m["train_loss"],
        "energy": m["energy"],
        "train_peak_gb": m["memory"]["peak_gb"],
        "eval_after": m.get("eval_after"),
    }


def run_ours(config: TuneConfig) -> dict[str, Any]:
    from effllm.tuner.train import run

    m = run(config.replace(eval_before=False), progress_bar=False).metrics
    # The loop reports its mean; the per-step list is what p50 needs, rebuilt from the events' clock.
    out = _summary(m, m["step_times_s"])
    out.update(
        padding_waste=m["padding_waste"],
        step_breakdown_s=m["step_breakdown_s"],
        autocast=m["autocast"],
        speedups=m["speedups"],
    )
    return out


def run_hf_trainer(config: TuneConfig) -> dict[str, Any]:
    """PEFT (LoRA family) or plain requires_grad (freeze/full) + transformers.Trainer on our batches."""
    import tempfile

    from torch.utils.data import SequentialSampler
    from transformers import Trainer, TrainerCallback, TrainingArguments

    from effllm.tuner import data, methods, speed
    from effllm.tuner.measure import start_meter
    from effllm.tuner.train import collate, evaluate, micro_batches, prepare

    # The same calls in the same order as train.run, so the RNG gives the same adapter initialisation.
    torch.manual_seed(config.seed)
    dataset, _, tokenizer, encoder, train_set, model = prepare(config)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    device = next(model.parameters()).device
    amp = speed.autocast_dtype(config.autocast, device)
    if amp is not None:
        speed.fp32_master_weights(model)
    total_steps = config.max_steps or config.epochs * math.ceil(
        len(train_set) / (config.batch_size * config.grad_accum)
    )
    order = list(
        itertools.islice(
            micro_batches(train_set, config.batch_size, config.seed), total_steps * config.grad_accum
        )
    )
    optimizer = methods.build_optimizer(model, config)
    scheduler = methods.build_scheduler(optimizer, config, total_steps)
    counts = {"tokens": 0, "target_tokens": 0, "samples": 0}
    micro_losses: list[float] = []
    step_times: list[float] = []

    class SameWorkTrainer(Trainer):
        def _get_train_sampler(self, train_dataset: Any = None) -> Any:
            return SequentialSampler(self.train_dataset)  # type: ignore[arg-type]

        def training_step(self, model: Any, inputs: Any, num_items_in_batch: Any = None) -> torch.Tensor:
            counts["tokens"] += int(inputs["attention_mask"].sum())
            counts["target_tokens"] += int((inputs["labels"][:, 1:] != data.IGNORE).sum())
            counts["samples"] += int(inputs["input_ids"].shape[0])
            loss = super().training_step(model, inputs, num_items_in_batch)
            micro_losses.append(float(loss))
            return loss

    class StepClock(TrainerCallback):
        def on_train_begin(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            self.last = time.perf_counter()

        def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            now = time.perf_counter()
            step_times.append(now - self.last)
            self.last = now

    with tempfile.TemporaryDirectory() as tmp:
        args = TrainingArguments(
            output_dir=tmp,
            per_device_train_batch_size=1,  # one dataset item = one of our micro-batches
            gradient_accumulation_steps=config.grad_accum,
            max_steps=total_steps,
            max_grad_norm=config.max_grad_norm,
            seed=config.seed,
            bf16=amp is not None,
            gradient_checkpointing=config.gradient_checkpointing,
            gradient_checkpointing_kwargs={"use_reentrant": False},
            save_strategy="no",
            eval_strategy="no",
            logging_strategy="no",
            report_to=[],
            use_cpu=device.type == "cpu",
            dataloader_num_workers=0,
            disable_tqdm=True,
        )
        trainer = SameWorkTrainer(
            model=model,
            args=args,
            train_dataset=order,  # type: ignore[arg-type]
            data_collator=lambda items: collate(items[0], pad, device),
            optimizers=(optimizer, scheduler),
            callbacks=[StepClock()],
        )
        meter = start_meter()
        try:
            trainer.train()
        finally:
            usage = meter.stop()
    per_step = [
        sum(micro_losses[i : i + config.grad_accum]) for i in range(0, len(micro_losses), config.grad_accum)
    ]
    after = evaluate(model, tokenizer, encoder, dataset.eval, config, lambda: False) if dataset.eval else None
    m = {
        **counts,
        "train_loss": per_step,
        "energy": {
            "joules": usage.energy_j,
            "mean_power_w": usage.mean_power_w,
            "source": usage.energy_source,
        },
        "memory": {"peak_gb": usage.peak_memory_gb},
        "eval_after": after,
    }
    return {**_summary(m, step_times), "autocast": str(amp).removeprefix("torch.") if amp else "off"}


def run_base_eval(config: TuneConfig) -> dict[str, Any]:
    """The untrained model's held-out metrics, scored by the same evaluate() as both tuned sides."""
    from effllm.tuner import data
    from effllm.tuner.train import evaluate, load_base

    dataset = data.load_dataset(config.data, n_train=1, n_eval=config.n_eval, seed=config.seed)
    _, tokenizer, model = load_base(config)
    encoder = data.Encoder(tokenizer, config.max_length)
    return {"eval": evaluate(model, tokenizer, encoder, dataset.eval, config, lambda: False)}


def main(argv: list[str]) -> int:
    spec = json.loads(argv[0])
    torch.set_num_threads(int(spec["threads"]))
    config = TuneConfig.from_dict(spec["config"])
    load_before = load_average()
    side = {"ours": run_ours, "hf": run_hf_trainer, "base": run_base_eval}[spec["side"]]
    result = side(config)
    result.update(
        side=spec["side"],
        threads=torch.get_num_threads(),
        peak_rss_gb=_peak_rss_gb(),
        load_before=load_before,
        load_after=load_average(),
    )
    print("BENCH_RESULT " + json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
