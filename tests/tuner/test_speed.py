"""The step's speed-ups are exact: packing and target-only logits give the padded path's per-token losses
and gradients on a tiny random Llama; bf16 autocast trains a tiny task to fp32's held-out metric."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from effllm.tuner import data, speed, tasks, train
from effllm.tuner.config import TuneConfig
from effllm.tuner.events import ProgressEvent

from .tiny import save_tiny_llama, tiny_llama

pytestmark = pytest.mark.model  # loads the real model (deselected by scripts/test.sh --fast)

CPU = torch.device("cpu")


def _examples(tokenizer: object, n: int = 7) -> list[data.Encoded]:
    """Examples of three tasks (91..128 tokens): lengths differ, so padding and packing both have work."""
    enc = data.Encoder(tokenizer, 128)
    out = []
    for name in ("json_extract", "reverse_words", "uppercase_json"):
        out += [enc.encode(r) for r in tasks.generate(name, 3, 0)[0]]
    return out[:n]


def _token_losses(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Per-target-token cross-entropy, sorted: [N]. Sorting makes padded and packed layouts comparable."""
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "position_ids") if k in batch}
    logits = model(**inputs, use_cache=False).logits[:, :-1]
    targets = batch["labels"][:, 1:]
    keep = targets != data.IGNORE
    return F.cross_entropy(logits[keep].float(), targets[keep], reduction="none").sort().values


@pytest.mark.parametrize("capacity", [200, 400])
def test_packing_gives_the_padded_loss_per_token(capacity: int) -> None:
    model, tokenizer = tiny_llama()
    model.eval()
    batch = _examples(tokenizer)
    pad = tokenizer.pad_token_id  # type: ignore[attr-defined]
    padded = train.collate(batch, pad, CPU)
    packed, layout = speed.pack(batch, pad, capacity, CPU)
    assert packed["input_ids"].shape[0] < len(batch)  # rows really hold several examples
    assert layout.real == sum(len(e.input_ids) for e in batch) and layout.slots == packed["input_ids"].numel()
    with torch.no_grad():
        a, b = _token_losses(model, padded), _token_losses(model, packed)
    assert a.shape == b.shape and a.shape[0] == sum(e.n_target for e in batch)
    assert (a - b).abs().max() < 1e-4, (a - b).abs().max()
    # The control: the same packed rows with positions that do not restart let tokens see the example before
    # theirs. The losses move, so the check above would catch a mask that leaks across boundaries.
    width = packed["input_ids"].shape[1]
    leaky = {**packed, "position_ids": torch.arange(width).expand_as(packed["input_ids"])}
    with torch.no_grad():
        assert (a - _token_losses(model, leaky)).abs().max() > 1e-3


def test_packed_and_target_only_steps_give_the_padded_gradient() -> None:
    model, tokenizer = tiny_llama()
    batch = _examples(tokenizer)
    pad = tokenizer.pad_token_id  # type: ignore[attr-defined]
    grads: list[torch.Tensor] = []
    losses: list[float] = []
    for laid, on_targets in (
        (train.collate(batch, pad, CPU), False),
        (train.collate(batch, pad, CPU), True),
        (speed.pack(batch, pad, 256, CPU)[0], True),
    ):
        model.zero_grad()
        loss, n = train.token_loss_sum(model, laid, on_targets)
        assert n == sum(e.n_target for e in batch)
        (loss / n).backward()
        losses.append(float(loss.detach()) / n)
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    for other, g in zip(losses[1:], grads[1:], strict=True):
        assert abs(other - losses[0]) < 1e-5
        assert torch.allclose(g, grads[0], atol=1e-5, rtol=1e-3)


def test_target_positions_are_the_positions_before_targets() -> None:
    labels = torch.tensor([[-100, -100, 5, 6, -100], [-100, 7, -100, -100, -100]])
    assert speed.target_positions(labels).tolist() == [0, 1, 2]


def test_autocast_auto_follows_the_cpu_flags() -> None:
    flags = Path("/proc/cpuinfo").read_text()
    native = "avx512_bf16" in flags or "amx_bf16" in flags
    assert speed.autocast_dtype("auto", CPU) == (torch.bfloat16 if native else None)
    assert speed.autocast_dtype("bf16", CPU) == torch.bfloat16 and speed.autocast_dtype("off", CPU) is None


def test_fp32_master_weights_cast_only_trainable() -> None:
    model, _ = tiny_llama()
    model.to(torch.bfloat16)
    for p in model.model.layers[0].parameters():
        p.requires_grad_(False)
    cast = speed.fp32_master_weights(model)
    assert cast == sum(1 for p in model.parameters() if p.requires_grad) > 0
    assert all((p.dtype == torch.float32) == p.requires_grad for p in model.parameters())


def test_bf16_autocast_trains_to_the_fp32_held_out_metric(tmp_path: Path) -> None:
    """Full tuning of the tiny model on one task, 24 steps: held-out loss falls by half either way and bf16
    autocast ends within 3 % of fp32 (bf16 keeps 8 mantissa bits; the fp32 master weights absorb that)."""
    config = TuneConfig(
        method="full",
        model=str(save_tiny_llama(tmp_path / "tiny")),
        data="task:uppercase_json",
        n_train=64,
        n_eval=16,
        batch_size=8,
        max_steps=24,
        lr=3e-3,
        max_length=128,
        schedule="constant",
        eval_max_new_tokens=4,
        packing=True,
    )
    after = {}
    for autocast in ("off", "bf16"):
        m = train.run(config.replace(autocast=autocast), progress_bar=False).metrics
        assert m["autocast"] == ("bfloat16" if autocast == "bf16" else "off")
        before_loss, after[autocast] = m["eval_before"]["loss"], m["eval_after"]
        assert after[autocast]["loss"] < 0.5 * before_loss, (autocast, before_loss, after[autocast])
    assert after["bf16"]["loss"] == pytest.approx(after["off"]["loss"], rel=0.03)
    assert after["bf16"]["exact_match"] == after["off"]["exact_match"]


def test_gradient_checkpointing_and_packing_keep_the_loss_curve(tmp_path: Path) -> None:
    """Same data order and seed: recomputing activations, or packing rows, trains through the same losses;
    the breakdown and padding share are reported per step and for the run."""
    base = TuneConfig(
        method="full",
        model=str(save_tiny_llama(tmp_path / "tiny")),
        data="task:json_extract",
        n_train=24,
        n_eval=0,
        batch_size=6,
        max_steps=3,
        lr=1e-3,
        max_length=128,
        schedule="constant",
    )
    runs = {}
    for name, config in (
        ("plain", base),
        ("checkpointed", base.replace(gradient_checkpointing=True)),
        ("packed", base.replace(packing=True, pack_length=400)),
    ):
        events: list[object] = []
        runs[name] = train.run(config, on_event=events.append, progress_bar=False).metrics
        progress = [e for e in events if isinstance(e, ProgressEvent)]
        assert progress and all(e.forward_s > 0 and e.backward_s > 0 for e in progress)
    plain, packed = runs["plain"], runs["packed"]
    for other in (runs["checkpointed"], packed):
        assert other["train_loss"] == pytest.approx(plain["train_loss"], abs=1e-4)
        assert (other["tokens"], other["target_tokens"]) == (plain["tokens"], plain["target_tokens"])
    assert 0 <= packed["padding_waste"] < 0.5 and 0 < plain["padding_waste"] < 0.5
    assert set(plain["step_breakdown_s"]) == set(speed.PHASES) and plain["first_step_s"] > 0
