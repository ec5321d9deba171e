"""The architecture family: random-init tiny checkpoints of one width, depth and tokenizer, one per
architecture of the study's axis (MHA, GQA, MQA, MLA, MoE, Mamba-2, GPT-NeoX; RWKV and Mamba-1), for
controlled comparisons where no pretrained weights ship offline.

Invariant: every checkpoint says it is random-init (config key `effllm_family` and a README.md in its
folder), and the same Shape and seed give the same bytes. `family_configs` is pure (config dicts only);
`make_family` builds the weights (torch, transformers) and copies the tokenizer in.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

MEMBERS = ("mha", "gqa", "mqa", "mla", "moe", "mamba2", "gpt-neox", "rwkv", "mamba")
FAMILY_KEY = "effllm_family"
_NOT_TOKENIZER = {"config.json", "generation_config.json", "README.md"}


@dataclass(frozen=True)
class Shape:
    layers: int = 4
    hidden: int = 128
    heads: int = 4  # query heads; head_dim = hidden / heads
    intermediate: int = 384  # the dense MLP; an MoE expert gets half (top-2 of 8: the same active size)
    vocab_size: int = 49152  # SmolLM2's tokenizer
    max_positions: int = 2048
    seed: int = 0

    def __post_init__(self) -> None:
        if self.layers < 1 or self.hidden < 32 or self.heads < 1 or self.vocab_size < 2:
            raise ValueError("layers >= 1, hidden >= 32, heads >= 1 and vocab_size >= 2 are required")
        if self.hidden % self.heads or self.heads % 2:
            raise ValueError(f"hidden {self.hidden} must divide into {self.heads} heads, an even number")
        if self.hidden % 32 or self.intermediate % 64:
            raise ValueError(
                "hidden must be a multiple of 32 and intermediate of 64 (vLLM's CPU MoE kernels take "
                "multiples of 32, and an expert is half the dense MLP)"
            )

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads


def family_configs(shape: Shape, special: dict[str, int] | None = None) -> dict[str, dict[str, Any]]:
    """member -> its config.json dict. `special`: bos/eos/pad token ids of the tokenizer."""
    ids = dict(special or {})
    mark = {FAMILY_KEY: {"random_init": True, "seed": shape.seed, "shape": asdict(shape)}}
    base: dict[str, Any] = dict(
        hidden_size=shape.hidden,
        num_hidden_layers=shape.layers,
        vocab_size=shape.vocab_size,
        max_position_embeddings=shape.max_positions,
        tie_word_embeddings=True,  # every member: one embedding matrix, so parameters compare
        **ids,
        **mark,
    )
    attention = dict(
        num_attention_heads=shape.heads,
        head_dim=shape.head_dim,
        intermediate_size=shape.intermediate,
        hidden_act="silu",
        rms_norm_eps=1e-5,
    )
    llama = dict(model_type="llama", architectures=["LlamaForCausalLM"], **base, **attention)
    configs: dict[str, dict[str, Any]] = {
        "mha": {**llama, "num_key_value_heads": shape.heads},
        "gqa": {**llama, "num_key_value_heads": shape.heads // 2},
        "mqa": {**llama, "num_key_value_heads": 1},
        # DeepSeek-V2's MLA at the latent shape vLLM runs (kv_lora_rank 512, rope 64), dense MLPs throughout
        "mla": dict(
            model_type="deepseek_v2",
            architectures=["DeepseekV2ForCausalLM"],
            **base,
            num_attention_heads=shape.heads,
            num_key_value_heads=shape.heads,
            intermediate_size=shape.intermediate,
            moe_intermediate_size=shape.intermediate // 2,
            kv_lora_rank=512,
            q_lora_rank=None,
            qk_rope_head_dim=64,
            qk_nope_head_dim=shape.head_dim,
            v_head_dim=shape.head_dim,
            n_routed_experts=8,  # no layer routes: first_k_dense_replace covers them all
            first_k_dense_replace=shape.layers,
            rms_norm_eps=1e-5,
        ),
        # 8 experts of half the dense MLP, top-2: a token runs through as many MLP weights as a dense one
        "moe": dict(
            model_type="qwen3_moe",
            architectures=["Qwen3MoeForCausalLM"],
            **base,
            **{**attention, "intermediate_size": shape.intermediate},
            num_key_value_heads=shape.heads // 2,
            num_experts=8,
            num_experts_per_tok=2,
            moe_intermediate_size=shape.intermediate // 2,
            norm_topk_prob=True,
            decoder_sparse_step=1,
            mlp_only_layers=[],
        ),
        "mamba2": dict(
            model_type="mamba2",
            architectures=["Mamba2ForCausalLM"],
            **base,
            state_size=64,
            expand=2,
            head_dim=shape.head_dim,
            num_heads=2 * shape.hidden // shape.head_dim,
            n_groups=1,
            conv_kernel=4,
            chunk_size=64,
        ),
        # Pythia's layout (parallel residual, partial rotary, LayerNorm, GELU), MHA
        "gpt-neox": dict(
            model_type="gpt_neox",
            architectures=["GPTNeoXForCausalLM"],
            **base,
            num_attention_heads=shape.heads,
            intermediate_size=shape.intermediate,
            rotary_pct=0.25,
            use_parallel_residual=True,
            hidden_act="gelu",
        ),
        "rwkv": dict(
            model_type="rwkv",
            architectures=["RwkvForCausalLM"],
            **base,
            attention_hidden_size=shape.hidden,
            intermediate_size=shape.intermediate,
            context_length=shape.max_positions,
        ),
        "mamba": dict(
            model_type="mamba",
            architectures=["MambaForCausalLM"],
            **base,
            state_size=16,
            expand=2,
            conv_kernel=4,
        ),
    }
    return configs


def _readme(member: str, config: dict[str, Any]) -> str:
    shape = config[FAMILY_KEY]["shape"]
    return (
        f"# effllm architecture family: {member} (RANDOM-INIT)\n\n"
        "These weights are random (seeded), not trained: use this checkpoint to compare what an architecture "
        "costs (memory, KV cache, latency, throughput, energy), never what it knows. Its text is noise.\n\n"
        f"- model_type: {config['model_type']}\n- seed: {shape['seed']}\n"
        f"- layers {shape['layers']}, hidden {shape['hidden']}, heads {shape['heads']}, "
        f"intermediate {shape['intermediate']}, vocab {shape['vocab_size']} (SmolLM2's tokenizer)\n"
        "- made by `effllm models make-family`\n"
    )


def make_family(
    out: Path, tokenizer_dir: Path, shape: Shape = Shape(), members: tuple[str, ...] = MEMBERS
) -> dict[str, Path]:
    """Write each member's checkpoint under out/<member>/; returns member -> folder."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig

    unknown = sorted(set(members) - set(MEMBERS))
    if unknown:
        raise ValueError(f"unknown family members {unknown}; known: {', '.join(MEMBERS)}")
    source = json.loads((tokenizer_dir / "config.json").read_text())
    special = {k: source[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if k in source}
    if source.get("vocab_size") != shape.vocab_size:
        raise ValueError(f"vocab_size {shape.vocab_size} is not the tokenizer's {source.get('vocab_size')}")
    configs = family_configs(shape, special)
    written: dict[str, Path] = {}
    for member in members:
        config_dict = dict(configs[member])
        model_type = config_dict.pop("model_type")
        config = AutoConfig.for_model(model_type, **config_dict)
        torch.manual_seed(shape.seed)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        eos = {k: v for k, v in special.items() if k != "pad_token_id"}
        model.generation_config = GenerationConfig(**eos)
        target = out / member
        if target.exists():
            shutil.rmtree(target)
        model.save_pretrained(target, safe_serialization=True)
        for f in tokenizer_dir.iterdir():
            weights = f.suffix in (".safetensors", ".bin")
            if f.is_file() and not weights and f.name not in _NOT_TOKENIZER and not f.name.startswith("."):
                shutil.copy2(f, target / f.name)
        saved = json.loads((target / "config.json").read_text())
        if FAMILY_KEY not in saved:  # a config class that drops unknown keys: put the mark back
            saved[FAMILY_KEY] = configs[member][FAMILY_KEY]
            (target / "config.json").write_text(json.dumps(saved, indent=2) + "\n")
        (target / "README.md").write_text(_readme(member, configs[member]))
        written[member] = target
    return written
