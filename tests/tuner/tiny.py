"""A tiny random Llama with a tiny byte-level BPE tokenizer: the tuner's loop in seconds, not minutes.

The tokenizer is trained in-process on the built-in tasks' text (vocab 600, the default model's chat
template and special tokens), so the lm_head is [600, 64] rather than [49152, 64]: on a busy 2-core CPU the
vocabulary, not the layers, would otherwise be the whole cost of a step.
"""

from __future__ import annotations

from functools import cache
from pathlib import Path
from typing import Any

import torch

SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


@cache
def tiny_tokenizer() -> Any:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    from effllm.common.model import resolve_model
    from effllm.tuner import tasks

    template = AutoTokenizer.from_pretrained(resolve_model(None).path).chat_template
    texts = ["system user assistant You are a helpful AI assistant named SmolLM, trained by Hugging Face"]
    for name in ("json_extract", "reverse_words", "uppercase_json"):
        for record in tasks.generate(name, 200, 0, seed=99)[0]:
            texts += [m["content"] for m in record["messages"]]  # type: ignore[union-attr]
    bpe = Tokenizer(models.BPE(unk_token="<|endoftext|>"))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=600, special_tokens=SPECIAL, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    bpe.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        pad_token="<|im_end|>",
        unk_token="<|endoftext|>",
        chat_template=template,
    )


def tiny_llama(seed: int = 0) -> tuple[torch.nn.Module, Any]:
    """A 2-layer Llama (hidden 64, 4 heads, 2 KV heads) over tiny_tokenizer(); fp32."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = tiny_tokenizer()
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
    tokenizer.save_pretrained(path)
    return path
