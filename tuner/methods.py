"""The tuning methods: which parameters train and how the optimizer treats them.

LoRA, LoRA+, rsLoRA and DoRA are PEFT configurations (`use_rslora`, `use_dora`, `create_loraplus_optimizer`);
freeze trains chosen decoder layers of the base; full trains every parameter. Nothing here re-implements a
method PEFT already has.
Invariant: after `prepare`, exactly the parameters the method trains have requires_grad=True.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from .config import TuneConfig


@dataclass(frozen=True)
class ParamCount:
    trainable: int
    total: int

    @property
    def percent(self) -> float:
        return 100.0 * self.trainable / self.total if self.total else 0.0


def count_params(model: torch.nn.Module) -> ParamCount:
    # Tied weights (embeddings = lm_head in SmolLM2) appear once in parameters(): no double counting.
    params = list(model.parameters())
    return ParamCount(sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params))


def lora_config(config: TuneConfig) -> Any:
    from peft import LoraConfig

    return LoraConfig(
        r=config.rank,
        lora_alpha=config.alpha,  # type: ignore[arg-type]  # PEFT takes floats; its hint says int
        lora_dropout=config.dropout,
        target_modules=list(config.target_modules),
        use_rslora=config.method == "rslora",
        use_dora=config.method == "dora",
        task_type="CAUSAL_LM",
    )


def decoder_layers(model: torch.nn.Module) -> torch.nn.ModuleList:
    inner = getattr(model, "model", None)
    layers = getattr(inner, "layers", None)
    if not isinstance(layers, torch.nn.ModuleList):
        raise ValueError(
            "layers: freeze needs a decoder with model.layers (Llama-style); this model has none"
        )
    return layers


def prepare(model: torch.nn.Module, config: TuneConfig) -> torch.nn.Module:
    """Wrap or (un)freeze `model` for `config.method`; returns the module to train."""
    if config.is_lora_family:
        from peft import get_peft_model

        names = {n.rsplit(".", 1)[-1] for n, _ in model.named_modules()}
        missing = [t for t in config.target_modules if t not in names]
        if missing:
            raise ValueError(f"target_modules: {', '.join(missing)} not found in the model")
        return get_peft_model(model, lora_config(config))
    if config.method == "full":
        for p in model.parameters():
            p.requires_grad_(True)
        return model
    # freeze: everything off, then the chosen layers on.
    for p in model.parameters():
        p.requires_grad_(False)
    layers = decoder_layers(model)
    for index in config.layers:
        if not -len(layers) <= index < len(layers):
            raise ValueError(f"layers: {index} is out of range for a model with {len(layers)} layers")
        for p in layers[index].parameters():
            p.requires_grad_(True)
    return model


def build_optimizer(model: torch.nn.Module, config: TuneConfig) -> torch.optim.Optimizer:
    if config.method == "lora_plus":
        from peft.optimizers import create_loraplus_optimizer

        return create_loraplus_optimizer(  # type: ignore[no-any-return]
            model=model,  # type: ignore[arg-type]
            optimizer_cls=torch.optim.AdamW,
            lr=config.lr,
            loraplus_lr_ratio=config.loraplus_lr_ratio,
            weight_decay=config.weight_decay,
        )
    params = [p for p in model.parameters() if p.requires_grad]
    return torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)


def build_scheduler(optimizer: torch.optim.Optimizer, config: TuneConfig, total_steps: int) -> Any:
    from transformers import get_scheduler

    name = {"constant": "constant_with_warmup", "cosine": "cosine", "linear": "linear"}[config.schedule]
    return get_scheduler(
        name, optimizer, num_warmup_steps=config.warmup_steps, num_training_steps=total_steps
    )
