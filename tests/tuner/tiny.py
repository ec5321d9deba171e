"""A tiny random Llama checkpoint with the default model's tokenizer: the tuner's loop in seconds, not minutes."""

from __future__ import annotations

from pathlib import Path

import torch


def tiny_llama(seed: int = 0) -> tuple[torch.nn.Module, object]:
    """A 2-layer Llama (hidden 64, 4 heads, 2 KV heads) over SmolLM2's tokenizer; fp32, eval mode off."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from effllm.common.model import resolve_model

    tokenizer = AutoTokenizer.from_pretrained(resolve_model(None).path)
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return LlamaForCausalLM(config), tokenizer


def save_tiny_llama(path: Path, seed: int = 0) -> Path:
    model, tokenizer = tiny_llama(seed)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)  # type: ignore[attr-defined]
    return path
