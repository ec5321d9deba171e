"""The training loop: one config in, a trained model and its measurements out. CPU or CUDA, plain torch.

Order of a run: resolve the base, load data (all of it validated first), prepare the method, evaluate the
held-out split, train `total_steps` optimizer steps while telemetry's sampler (tuner/measure.py) samples
memory/utilisation/energy, evaluate again. Nothing is written to disk here (see export.py), so a run killed
at any point leaves nothing.
Loss is the mean over response tokens of a whole optimizer step: micro-batches of an accumulated step are
summed and divided once by the step's token count, so grad_accum does not change what is optimised.
Each step's wall time is split into collate / forward / backward / optimizer (speed.StepClock) and its token
slots into real and padding; the switches of speed.py (packing, target-only logits, bf16 autocast, compile,
gradient checkpointing) change how a step is computed, never which examples it sees or in what order.
Invariant: `should_stop()` is polled while data is generated and encoded, after the model loads, and between
micro-batches and eval batches; when it turns true the run raises Cancelled within one micro-batch.
"""

from __future__ import annotations

import math
import random
import statistics
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from tqdm import tqdm

from . import data, methods, speed
from .config import TuneConfig
from .events import Cancelled, Event, PhaseEvent, ProgressEvent
from .measure import start_meter

EventSink = Callable[[Event], None]


@dataclass
class RunResult:
    config: TuneConfig
    model: Any  # the PEFT model (LoRA family) or the base with trained weights
    tokenizer: Any
    dataset: data.Dataset
    base_name: str
    base_fingerprint: str
    metrics: dict[str, Any]


def _device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def load_base(config: TuneConfig) -> tuple[Any, Any, Any]:
    # Model resolution and the fingerprint adapters must match come from common/, as the server's do.
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from effllm.common.model import resolve_model

    resolved = resolve_model(config.model or None)
    dtype = torch.bfloat16 if config.precision == "bf16" else torch.float32
    tokenizer = AutoTokenizer.from_pretrained(resolved.path)
    model = AutoModelForCausalLM.from_pretrained(resolved.path, dtype=dtype)
    model.to(_device())  # type: ignore[arg-type]  # transformers types .to oddly
    return resolved, tokenizer, model


def collate(batch: Sequence[data.Encoded], pad_id: int, device: torch.device) -> dict[str, torch.Tensor]:
    """Right-pad to the longest example. input_ids/labels/attention_mask: [B, T]."""
    width = max(len(e.input_ids) for e in batch)
    ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    labels = torch.full((len(batch), width), data.IGNORE, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for i, e in enumerate(batch):
        n = len(e.input_ids)
        ids[i, :n] = torch.tensor(e.input_ids)
        labels[i, :n] = torch.tensor(e.labels)
        mask[i, :n] = 1
    return {"input_ids": ids.to(device), "labels": labels.to(device), "attention_mask": mask.to(device)}


def token_loss_sum(
    model: torch.nn.Module, batch: dict[str, torch.Tensor], logits_on_targets: bool = False
) -> tuple[torch.Tensor, int]:
    """Summed next-token cross-entropy over labelled tokens, and how many there were.

    `batch` is collate()'s (attention_mask) or speed.pack()'s (position_ids); with `logits_on_targets` the
    lm_head runs only at the K positions that predict a target (the same loss, less work)."""
    inputs: dict[str, Any] = {
        k: batch[k] for k in ("input_ids", "attention_mask", "position_ids") if k in batch
    }
    # No KV cache: it is never read here, and with one transformers skips the packed-sequence mask.
    inputs["use_cache"] = False
    targets = batch["labels"][:, 1:]  # token t is predicted from positions < t
    if logits_on_targets:
        keep = speed.target_positions(batch["labels"])  # [K]
        logits = model(**inputs, logits_to_keep=keep).logits  # [B, K, V]
        targets = targets[:, keep]
    else:
        logits = model(**inputs).logits[:, :-1]  # [B, T-1, V]
    loss = F.cross_entropy(
        logits.flatten(0, 1).float(), targets.flatten(), ignore_index=data.IGNORE, reduction="sum"
    )
    return loss, int((targets != data.IGNORE).sum())


def micro_batches(examples: list[data.Encoded], size: int, seed: int) -> Iterator[list[data.Encoded]]:
    """Endless shuffled epochs (seeded); the last short batch of an epoch is kept."""
    rng = random.Random(seed)
    while True:
        order = list(range(len(examples)))
        rng.shuffle(order)
        for i in range(0, len(order), size):
            yield [examples[j] for j in order[i : i + size]]


@torch.no_grad()
def evaluate(
    model: torch.nn.Module,
    tokenizer: Any,
    encoder: data.Encoder,
    records: Sequence[data.Record],
    config: TuneConfig,
    should_stop: Callable[[], bool],
) -> dict[str, Any]:
    """Held-out loss (mean over response tokens) and exact match of greedy answers (when records have one)."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    encoded = [encoder.encode(r) for r in records]
    total, count = 0.0, 0
    for i in range(0, len(encoded), config.batch_size):
        if should_stop():
            raise Cancelled()
        batch = collate(encoded[i : i + config.batch_size], pad, device)
        loss, n = token_loss_sum(model, batch, config.logits_on_targets)
        total, count = total + float(loss), count + n
    pairs = [p for p in (encoder.prompt_and_reference(r) for r in records) if p is not None]
    hits, examples = 0, list[dict[str, str]]()
    for i in range(0, len(pairs), config.batch_size):
        if should_stop():
            raise Cancelled()
        chunk = pairs[i : i + config.batch_size]
        answers = greedy(model, tokenizer, [p for p, _ in chunk], config.eval_max_new_tokens, pad)
        for (_, ref), ans in zip(chunk, answers, strict=True):
            hits += ans.strip() == ref.strip()
            if len(examples) < 3:
                examples.append({"reference": ref, "answer": ans})
    model.train(was_training)
    return {
        "loss": total / count if count else None,
        "exact_match": hits / len(pairs) if pairs else None,
        "n": len(records),
        "examples": examples,
    }


def greedy(model: Any, tokenizer: Any, prompts: list[list[int]], max_new: int, pad: int) -> list[str]:
    """Batched greedy decoding from token ids; left padding so every row's next token is at the end."""
    device = next(model.parameters()).device
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, width - len(p) :] = torch.tensor(p)
        mask[i, width - len(p) :] = 1
    out = model.generate(
        input_ids=ids.to(device),
        attention_mask=mask.to(device),
        max_new_tokens=max_new,
        do_sample=False,
        temperature=None,
        top_p=None,
        top_k=None,
        pad_token_id=pad,
        eos_token_id=tokenizer.eos_token_id,
    )
    return [tokenizer.decode(row[width:], skip_special_tokens=True) for row in out]


def prepare(
    config: TuneConfig, should_stop: Callable[[], bool] | None = None
) -> tuple[data.Dataset, Any, Any, data.Encoder, list[data.Encoded], Any]:
    """Data, base, tokenizer, encoded train set and the method-wrapped model, in one fixed order of RNG use:
    `run` and the bench's Trainer side (bench/_tuning_run.py) both call this after seeding, so both start
    from the same adapter initialisation."""
    stop = should_stop or (lambda: False)
    dataset = data.load_dataset(
        config.data,
        eval_data=config.eval_data,
        eval_fraction=config.eval_fraction,
        n_train=config.n_train,
        n_eval=config.n_eval,
        seed=config.seed,
        should_stop=stop,
    )
    resolved, tokenizer, base = load_base(config)
    if stop():
        raise Cancelled()
    encoder = data.Encoder(tokenizer, config.max_length)
    train_set = data.encode_all(encoder, dataset.train, f"data {config.data}", should_stop=stop)
    return dataset, resolved, tokenizer, encoder, train_set, methods.prepare(base, config)


def run(
    config: TuneConfig,
    *,
    on_event: EventSink | None = None,
    should_stop: Callable[[], bool] | None = None,
    progress_bar: bool = True,
) -> RunResult:
    emit = on_event or (lambda e: None)
    stop = should_stop or (lambda: False)
    torch.manual_seed(config.seed)
    t_start = time.perf_counter()

    emit(PhaseEvent("loading"))
    dataset, resolved, tokenizer, encoder, train_set, model = prepare(config, stop)
    params = methods.count_params(model)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    device = next(model.parameters()).device
    amp = speed.autocast_dtype(config.autocast, device)
    if amp is not None:
        speed.fp32_master_weights(model)  # the optimizer steps fp32 copies even when the base is bf16
    if config.gradient_checkpointing:
        enable = model.gradient_checkpointing_enable  # PreTrainedModel's, or a PeftModel's that forwards
        enable(gradient_checkpointing_kwargs={"use_reentrant": False})  # type: ignore[operator]
    step_model = speed.compile_model(model) if config.compile else model
    capacity = config.pack_length or 2 * config.max_length

    before = None
    if config.eval_before and dataset.eval:
        emit(PhaseEvent("eval_before"))
        before = evaluate(model, tokenizer, encoder, dataset.eval, config, stop)

    per_step = config.batch_size * config.grad_accum
    total_steps = config.max_steps or config.epochs * math.ceil(len(train_set) / per_step)
    optimizer = methods.build_optimizer(model, config)
    scheduler = methods.build_scheduler(optimizer, config, total_steps)
    batches = micro_batches(train_set, config.batch_size, config.seed)
    trainable = [p for p in model.parameters() if p.requires_grad]

    def layout(micro: list[data.Encoded]) -> tuple[dict[str, torch.Tensor], speed.Layout]:
        if config.packing:
            return speed.pack(micro, pad, capacity, device)
        batch = collate(micro, pad, device)
        return batch, speed.Layout(int(batch["attention_mask"].sum()), batch["attention_mask"].numel())

    emit(PhaseEvent("training", total_steps))
    model.train()
    losses: list[float] = []
    step_times: list[float] = []
    phase_s = dict.fromkeys(speed.PHASES, 0.0)
    samples = tokens = target_tokens = slots = tokens_step1 = 0
    meter = start_meter()
    bar = tqdm(total=total_steps, desc=f"tune {config.method}", unit="step", disable=not progress_bar)
    try:
        for step in range(1, total_steps + 1):
            t0 = time.perf_counter()
            clock = speed.StepClock(cuda=device.type == "cuda")
            with clock.phase("collate"):
                group = [next(batches) for _ in range(config.grad_accum)]
                laid = [layout(micro) for micro in group]
            n_target = sum(e.n_target for b in group for e in b)  # divide once, over the whole step
            step_loss = 0.0
            step_tokens = step_slots = 0
            for micro, (batch, shape) in zip(group, laid, strict=True):
                if stop():
                    raise Cancelled()
                with clock.phase("forward"), speed.autocast(amp, device):
                    loss_sum, n = token_loss_sum(step_model, batch, config.logits_on_targets)
                with clock.phase("backward"):
                    (loss_sum / n_target).backward()
                step_loss += float(loss_sum.detach()) / n_target
                samples += len(micro)
                target_tokens += n
                step_tokens += shape.real
                step_slots += shape.slots
            with clock.phase("optimizer"):
                if config.max_grad_norm > 0:
                    torch.nn.utils.clip_grad_norm_(trainable, config.max_grad_norm)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
            dt = time.perf_counter() - t0
            step_times.append(dt)
            losses.append(step_loss)
            tokens += step_tokens
            slots += step_slots
            tokens_step1 = tokens_step1 or step_tokens
            for name, sec in clock.seconds.items():
                phase_s[name] += sec
            elapsed = sum(step_times)
            event = ProgressEvent(
                step=step,
                total_steps=total_steps,
                loss=step_loss,
                lr=scheduler.get_last_lr()[0],
                tokens_per_s=step_tokens / dt,
                samples_per_s=per_step / dt,
                elapsed_s=elapsed,
                eta_s=elapsed / step * (total_steps - step),
                **{f"{name}_s": sec for name, sec in clock.seconds.items()},
                padding_waste=1 - step_tokens / step_slots,
            )
            bar.set_postfix(loss=f"{step_loss:.4f}", tok_s=f"{step_tokens / dt:.0f}")
            bar.update(1)
            emit(event)
    finally:
        bar.close()
        usage = meter.stop()

    after = None
    if dataset.eval:
        emit(PhaseEvent("eval_after"))
        after = evaluate(model, tokenizer, encoder, dataset.eval, config, stop)

    train_time = sum(step_times)
    metrics = {
        "method": config.method,
        "model": resolved.name,
        "device": str(device),
        "precision": config.precision,
        "autocast": str(amp).removeprefix("torch.") if amp is not None else "off",
        "speedups": {
            k: getattr(config, k)
            for k in ("packing", "compile", "gradient_checkpointing", "logits_on_targets")
        },
        "params": {"trainable": params.trainable, "total": params.total, "trainable_percent": params.percent},
        "steps": total_steps,
        "samples": samples,
        "tokens": tokens,  # real (non-pad) tokens of the examples trained on
        "target_tokens": target_tokens,  # tokens that carried loss
        "padding_waste": 1 - tokens / slots if slots else 0.0,  # padded slots / all slots
        "step_breakdown_s": {name: sec / total_steps for name, sec in phase_s.items()},  # mean per step
        # step 1 carries one-off costs (torch.compile's warm-up, allocator growth); steady = steps 2..
        "first_step_s": step_times[0],
        "step_times_s": step_times,
        "tokens_per_s_steady": (tokens - tokens_step1) / sum(step_times[1:]) if total_steps > 1 else None,
        "step_latency_s": statistics.fmean(step_times),  # AL
        "step_latency_p50_s": statistics.median(step_times),
        "samples_per_s": samples / train_time,
        "tokens_per_s": tokens / train_time,
        # The paper's fine-tuning throughput ST = sum(samples / params) / sum(time), params = the whole model.
        "samples_per_param_s": samples / params.total / train_time,
        "memory": {"peak_gb": usage.peak_memory_gb, "amu_gb": usage.amu_gb},
        "pcu": usage.pcu,
        "energy": {
            "joules": usage.energy_j,
            "mean_power_w": usage.mean_power_w,
            "source": usage.energy_source,
        },
        "train_loss": losses,
        "eval_before": before,
        "eval_after": after,
        "train_time_s": train_time,
        "wall_time_s": time.perf_counter() - t_start,
    }
    return RunResult(config, model, tokenizer, dataset, resolved.name, resolved.fingerprint, metrics)
