"""What a checkpoint's config.json says about its architecture, and which engine can run it.

Pure: reads a config dict (json.loads of config.json), imports no torch. `describe` gives the study's
architecture axis (family, attention kind, KV heads, experts, SSM); `engine_support` says whether an
engine can serve it, and if not, why and what to do instead.
Invariant: every refusal names the architecture, the reason and the way out; `effllm serve` asks before it
loads an engine, so an architecture an engine cannot run is refused at start-up, never in traffic.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# model_type -> family. "transformer": a dense decoder; "moe": a decoder with routed experts in its MLP.
_FAMILIES = {
    "llama": "transformer",
    "mistral": "transformer",
    "qwen2": "transformer",
    "qwen3": "transformer",
    "gemma2": "transformer",
    "gemma3": "transformer",
    "gemma3_text": "transformer",
    "gpt_neox": "gpt-neox",
    "deepseek_v2": "mla",
    "deepseek_v3": "mla",
    "qwen2_moe": "moe",
    "qwen3_moe": "moe",
    "mixtral": "moe",
    "olmoe": "moe",
    "mamba": "mamba",
    "mamba2": "mamba2",
    "rwkv": "rwkv",
}
ATTENTION_FREE = ("mamba", "mamba2", "rwkv")
# vLLM's MLA kernels exist for DeepSeek's own latent shape only
VLLM_MLA_SHAPE = {"kv_lora_rank": 512, "qk_rope_head_dim": 64}


@dataclass(frozen=True)
class Architecture:
    model_type: str
    family: str  # transformer, moe, mla, gpt-neox, mamba, mamba2, rwkv, or the model_type when unknown
    attention: str  # MHA, GQA, MQA, MLA, NSA, none
    layers: int
    hidden: int
    heads: int  # query heads (0: attention-free)
    kv_heads: int  # key/value heads (MLA: 1 shared latent; 0: attention-free)
    head_dim: int
    experts: int = 0  # routed experts per MoE layer (0: dense)
    top_k: int = 0  # experts each token runs through
    moe_layers: int = 0
    expert_intermediate: int = 0
    ssm: bool = False  # a recurrent state instead of a KV cache
    sliding_window: int = 0  # tokens a sliding-window layer sees (0: none)
    sliding_layers: int = 0
    kv_lora_rank: int = 0  # MLA latent width
    rope_dim: int = 0  # MLA: the decoupled rope key width
    random_init: bool = False  # an effllm family member: untrained weights

    def kv_bytes_per_token(self, dtype_bytes: int) -> int:
        """KV-cache bytes one more token adds, all layers (attention-free: 0, the state is constant)."""
        if self.attention == "none":
            return 0
        if self.attention == "MLA":  # the compressed latent and the shared rope key, one per layer
            return self.layers * (self.kv_lora_rank + self.rope_dim) * dtype_bytes
        return 2 * self.layers * self.kv_heads * self.head_dim * dtype_bytes

    def active_parameters(self, parameters: int) -> int:
        """Parameters one token runs through: all but the routed experts it skips (gate, up, down each)."""
        if not self.experts:
            return parameters
        skipped = (self.experts - self.top_k) * 3 * self.hidden * self.expert_intermediate
        return parameters - self.moe_layers * skipped


def _int(config: Mapping[str, Any], *keys: str, default: int = 0) -> int:
    for key in keys:
        value = config.get(key)
        if value is not None:
            return int(value)
    return default


def _attention_kind(heads: int, kv_heads: int) -> str:
    if kv_heads == heads:
        return "MHA"
    return "MQA" if kv_heads == 1 else "GQA"


def is_nsa(config: Mapping[str, Any]) -> bool:
    """Native sparse attention (DeepSeek-V3.2's indexer, or a config that says nsa)."""
    return "nsa" in str(config.get("model_type", "")) or "index_topk" in config or "nsa_config" in config


def describe(config: Mapping[str, Any]) -> Architecture:
    """The architecture of a config.json dict; ValueError on a config with no model_type."""
    model_type = str(config.get("model_type") or "")
    if not model_type:
        raise ValueError("config.json has no model_type")
    family = _FAMILIES.get(model_type, model_type)
    layers = _int(config, "num_hidden_layers", "n_layer", "num_layers")
    hidden = _int(config, "hidden_size", "d_model", "n_embd")
    common = dict(
        model_type=model_type,
        family=family,
        layers=layers,
        hidden=hidden,
        random_init="effllm_family" in config,
    )
    if family in ATTENTION_FREE:
        return Architecture(attention="none", heads=0, kv_heads=0, head_dim=0, ssm=True, **common)  # type: ignore[arg-type]
    heads = _int(config, "num_attention_heads", "n_head")
    if family == "mla":
        rope = _int(config, "qk_rope_head_dim")
        return Architecture(
            attention="NSA" if is_nsa(config) else "MLA",
            heads=heads,
            kv_heads=1,
            head_dim=_int(config, "qk_nope_head_dim") + rope,
            kv_lora_rank=_int(config, "kv_lora_rank"),
            rope_dim=rope,
            **_moe(config, layers),
            **common,  # type: ignore[arg-type]
        )
    kv_heads = _int(config, "num_key_value_heads", default=heads)
    head_dim = _int(config, "head_dim", default=hidden // heads if heads else 0)
    layer_types = list(config.get("layer_types") or ())
    sliding = sum(t == "sliding_attention" for t in layer_types)
    return Architecture(
        attention="NSA" if is_nsa(config) else _attention_kind(heads, kv_heads),
        heads=heads,
        kv_heads=kv_heads,
        head_dim=head_dim,
        sliding_window=_int(config, "sliding_window") if sliding else 0,
        sliding_layers=sliding,
        **_moe(config, layers),
        **common,  # type: ignore[arg-type]
    )


def _moe(config: Mapping[str, Any], layers: int) -> dict[str, Any]:
    experts = _int(config, "num_experts", "num_local_experts", "n_routed_experts")
    if not experts:
        return {}
    dense_first = _int(config, "first_k_dense_replace")
    dense = set(config.get("mlp_only_layers") or ())
    step = max(1, _int(config, "decoder_sparse_step", default=1))
    moe_layers = sum(1 for i in range(layers) if i >= dense_first and i not in dense and (i + 1) % step == 0)
    if not moe_layers:
        return {}
    return dict(
        experts=experts,
        top_k=_int(config, "num_experts_per_tok", "moe_top_k"),
        moe_layers=moe_layers,
        expert_intermediate=_int(config, "moe_intermediate_size", "intermediate_size"),
    )


def engine_support(
    engine: str, config: Mapping[str, Any], *, precision: str = "fp32", max_concurrency: int = 1
) -> tuple[bool, str]:
    """(True, "") if `engine` (vllm or hf) can serve this architecture at this precision and batch size,
    else (False, "<model_type>: <why>; <the way out>")."""
    arch = describe(config)
    name = arch.model_type
    if arch.attention == "NSA":
        return False, f"{name}: native sparse attention (NSA) runs on neither engine here"
    if engine == "hf":
        return _hf_support(arch, max_concurrency)
    if engine != "vllm":
        raise ValueError(f"engine is vllm or hf, not {engine!r}")
    if arch.family == "rwkv":
        return False, f"{name}: vLLM has no RWKV model; use --engine hf"
    if arch.family == "mamba":
        return False, f"{name}: vLLM on CPU cannot prefill Mamba-1 (no selective_scan_fwd); use --engine hf"
    if arch.attention == "MLA":
        shape = {"kv_lora_rank": arch.kv_lora_rank, "qk_rope_head_dim": arch.rope_dim}
        if shape != VLLM_MLA_SHAPE:
            return False, (
                f"{name}: vLLM's MLA runs kv_lora_rank 512 and qk_rope_head_dim 64 only, this model has "
                f"{arch.kv_lora_rank} and {arch.rope_dim}; use --engine hf"
            )
        if precision != "bf16":
            return False, f"{name}: vLLM runs MLA in bf16 only, not {precision}; use --precision bf16"
    if arch.experts and (arch.hidden % 32 or arch.expert_intermediate % 32):
        return False, (
            f"{name}: vLLM's CPU MoE kernels need hidden and expert sizes that are multiples of 32 "
            f"(this model: {arch.hidden} and {arch.expert_intermediate}); use --engine hf"
        )
    return True, ""  # an architecture not named here: vLLM's own loader decides, still at start-up


def _hf_support(arch: Architecture, max_concurrency: int) -> tuple[bool, str]:
    name = arch.model_type
    # NOTE: the hf engine batches rows by concatenating DynamicCache key/value tensors and passes the
    # cache as past_key_values (server/engines/hf_batch.py); a recurrent state (cache_params / state) is
    # never carried from one step to the next, so an attention-free model would decode from a blank state.
    if arch.ssm:
        way_out = "use --engine vllm" if arch.family == "mamba2" else "run it with transformers directly"
        return False, (
            f"{name}: effllm's hf engine carries attention KV caches only, not a recurrent SSM/RWKV "
            f"state; {way_out}"
        )
    if arch.sliding_layers and max_concurrency > 1:
        return False, (
            f"{name}: {arch.sliding_layers} sliding-window layers, whose caches the hf engine cannot batch; "
            "use --engine vllm or --max-concurrency 1"
        )
    return True, ""


def require_support(engine: str, model_dir: Path, *, precision: str, max_concurrency: int) -> None:
    """ValueError naming the engine, the reason and the way out if `engine` cannot serve this checkpoint."""
    config = json.loads((model_dir / "config.json").read_text())
    ok, reason = engine_support(engine, config, precision=precision, max_concurrency=max_concurrency)
    if not ok:
        raise ValueError(f"--engine {engine}: {reason}")
