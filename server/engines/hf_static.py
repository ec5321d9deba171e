"""The hf engine's static decode step: one token per row of a Llama over a preallocated KV cache.

gpt-fast's idea on transformers' own weights: the KV cache is one tensor per layer and kind,
[slots, kv_heads, max_len, head_dim], allocated once; row b of a step is cache slot b and writes its
token's K/V at its own position; attention reads the slots' first L positions under a mask (position
<= the row's own), so rows of any lengths share one step and nothing is ever re-padded or moved.
`decode_step` is a plain function of tensors (what torch.compile needs, see hf_compiled) and follows
transformers' Llama modules op for op (RMSNorm in fp32 then the weight, RoPE as rotate_half, SDPA with
the head_dim**-0.5 scale, SiLU MLP, logits in fp32), with hf_lora's stacked LoRA delta written exactly as
hf_lora applies it (fp32 gathered bmm, base output + delta, cast back), so its greedy tokens are the
eager path's. The weights are the HF model's own tensors (fp32, bf16 or torchao int4), never copied.

Invariant: cache slot s holds at positions 0..length-1 exactly the post-RoPE K/V that transformers'
DynamicCache holds for the row in slot s; a position past a row's length is written before it is read.
"""

from __future__ import annotations

import heapq
from collections.abc import Sequence
from typing import Any, NamedTuple

import torch
from torch import nn
from torch.nn import functional as F

from .hf_lora import LORA_DTYPE, StackedLora

# a decoder layer's Linear modules, in the order decode_step reads them
LINEARS = (
    "self_attn.q_proj",
    "self_attn.k_proj",
    "self_attn.v_proj",
    "self_attn.o_proj",
    "mlp.gate_proj",
    "mlp.up_proj",
    "mlp.down_proj",
)
_Q, _K, _V, _O, _GATE, _UP, _DOWN = range(len(LINEARS))
Lora = tuple[torch.Tensor, torch.Tensor] | None  # one Linear's stacked (A [cap, r, in], B [cap, out, r])


class Linear(NamedTuple):
    weight: torch.Tensor  # [out, in]; a torchao int4 tensor at int4
    bias: torch.Tensor | None


class Layer(NamedTuple):
    input_norm: torch.Tensor  # [hidden]
    post_norm: torch.Tensor  # [hidden]
    linears: tuple[Linear, ...]  # in LINEARS order
    qkv: Linear | None  # [q+k+v, hidden]: q/k/v_proj's weights as row blocks of one tensor (fused)
    gate_up: Linear | None  # [2 * intermediate, hidden]: gate_proj's, then up_proj's (fused)


class DecodeWeights(NamedTuple):
    layers: tuple[Layer, ...]
    norm: torch.Tensor  # [hidden]
    head: Linear  # lm_head, [vocab, hidden]
    eps: float
    heads: int
    kv_heads: int
    head_dim: int
    scaling: float


def module_names(layers: int) -> list[str]:
    """The Linear modules decode_step uses, as named in the HF model (and in hf_lora's stacks)."""
    return [f"model.layers.{i}.{name}" for i in range(layers) for name in LINEARS] + ["lm_head"]


def unsupported(model: Any, linears: dict[str, nn.Linear]) -> str | None:
    """Why this model cannot take the static step (None: it can)."""
    cfg = model.config
    if getattr(cfg, "model_type", "") != "llama":
        return f"model_type {getattr(cfg, 'model_type', '?')!r} (the static step is written for llama)"
    if getattr(cfg, "hidden_act", "silu") != "silu":
        return f"hidden_act {cfg.hidden_act!r} (the static step has SiLU)"
    missing = [n for n in module_names(cfg.num_hidden_layers) if n not in linears]
    if missing:
        return f"{missing[0]} is not a plain Linear"
    return None


_FUSED = ((_Q, _K, _V), (_GATE, _UP))  # groups of a layer's LINEARS that one fused product reads


def _plain(t: torch.Tensor) -> bool:
    """A dense tensor (not a torchao int4 one or another subclass, whose layout is not rows of floats)."""
    return type(t) is torch.Tensor


def fuse_projections(model: Any, linears: dict[str, nn.Linear]) -> int:
    """Give each layer's q/k/v_proj and gate/up_proj weights (and biases) one storage, as adjacent row
    blocks: a new [sum of outs, in] tensor per group, each module's weight then a view of its block (the
    same Parameter object, `.data` swapped: hooks, PEFT wrappers and the eager forward see the same values
    in the same layout). The old tensors are freed as each group is copied, so memory stays one copy.
    Skips a group whose weights are not plain dense tensors (int4) or whose biases are mixed. Returns the
    groups fused (already fused ones count too)."""
    fused = 0
    with torch.no_grad():
        for i in range(model.config.num_hidden_layers):
            for group in _FUSED:
                modules = [linears[f"model.layers.{i}.{LINEARS[j]}"] for j in group]
                weights = [m.weight.detach() for m in modules]
                biases = [m.bias for m in modules]
                if not all(_plain(w) for w in weights) or len({b is None for b in biases}) > 1:
                    continue
                if _joined(weights) is None:
                    whole = torch.cat(weights, dim=0)
                    for m, block in zip(modules, _blocks(whole, weights), strict=True):
                        m.weight.data = block
                    if biases[0] is not None:
                        whole_bias = torch.cat([b.detach() for b in biases if b is not None], dim=0)
                        for m, block in zip(modules, _blocks(whole_bias, weights), strict=True):
                            m.bias.data = block
                fused += 1
    return fused


def _blocks(whole: torch.Tensor, parts: list[torch.Tensor]) -> list[torch.Tensor]:
    """`whole` cut along dim 0 into views as tall as `parts`."""
    return list(whole.split([p.shape[0] for p in parts], dim=0))


def _joined(parts: Sequence[torch.Tensor | None]) -> torch.Tensor | None:
    """The one tensor whose consecutive row blocks `parts` are (a view of their shared storage), or None
    when they are not laid out so (not fused, a subclass, no bias)."""
    if any(p is None or not _plain(p) or not p.is_contiguous() for p in parts):
        return None
    tensors = [p for p in parts if p is not None]
    first = tensors[0]
    offset = first.storage_offset()
    for t in tensors:
        same = t.untyped_storage().data_ptr() == first.untyped_storage().data_ptr()
        if (
            not same
            or t.storage_offset() != offset
            or t.shape[1:] != first.shape[1:]
            or t.dtype != first.dtype
        ):
            return None
        offset += t.numel()
    rows = sum(t.shape[0] for t in tensors)
    return first.as_strided((rows, *first.shape[1:]), first.stride(), first.storage_offset())


def read_weights(model: Any, linears: dict[str, nn.Linear]) -> DecodeWeights:
    """The model's own tensors (the Linears as hf_lora found them, before PEFT wraps any), detached: the
    same storage, but with requires_grad False for good, so PEFT freezing the base later (it flips the
    flag) does not change what a compiled graph was guarded on."""
    cfg = model.config
    inner = model.model

    def linear(name: str) -> Linear:
        module = linears[name]
        return Linear(module.weight.detach(), None if module.bias is None else module.bias.detach())

    def fused(lins: tuple[Linear, ...], group: tuple[int, ...]) -> Linear | None:
        weight = _joined([lins[j].weight for j in group])
        if weight is None:
            return None
        bias = _joined([lins[j].bias for j in group])
        return None if bias is None and lins[group[0]].bias is not None else Linear(weight, bias)

    layers = []
    for i, layer in enumerate(inner.layers):
        lins = tuple(linear(f"model.layers.{i}.{name}") for name in LINEARS)
        layers.append(
            Layer(
                layer.input_layernorm.weight.detach(),
                layer.post_attention_layernorm.weight.detach(),
                lins,
                fused(lins, _FUSED[0]),
                fused(lins, _FUSED[1]),
            )
        )
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    return DecodeWeights(
        layers=tuple(layers),
        norm=inner.norm.weight.detach(),
        head=linear("lm_head"),
        eps=float(inner.norm.variance_epsilon),
        heads=int(cfg.num_attention_heads),
        kv_heads=int(cfg.num_key_value_heads),
        head_dim=int(head_dim),
        scaling=float(head_dim) ** -0.5,
    )


def lora_inputs(stack: StackedLora, names: list[str]) -> tuple[Lora, ...]:
    """Each Linear's stacked adapters (None where no resident adapter targets it), in `names` order."""
    out: list[Lora] = []
    for name in names:
        s = stack.stacks.get(name)
        out.append((s.a, s.b) if s is not None else None)
    return tuple(out)


class StaticKV:
    """The preallocated cache and who owns which slot. A slot is taken at join and freed at leave."""

    def __init__(self, weights: DecodeWeights, slots: int, max_len: int, dtype: Any, device: Any) -> None:
        # one spare position past max_len, never a row's: a step's attention length L <= max_len is then
        # always below the cache's size, so dynamo keeps L symbolic (at L == size it specialises the slice)
        shape = (slots, weights.kv_heads, max_len + 1, weights.head_dim)
        layers = len(weights.layers)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(layers)]
        self.slots, self.max_len = slots, max_len
        self._free = list(range(slots))  # a heap: the lowest free slot first keeps the buckets small

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in [*self.k, *self.v])

    def take(self) -> int:
        if not self._free:
            raise RuntimeError("static KV cache: no free slot (more rows than max_concurrency)")
        return heapq.heappop(self._free)

    def release(self, slot: int) -> None:
        if 0 <= slot < self.slots and slot not in self._free:
            heapq.heappush(self._free, slot)

    def reset(self) -> None:
        self._free = list(range(self.slots))

    def in_use(self) -> int:
        return self.slots - len(self._free)

    def move(self, old: int, new: int, length: int) -> None:
        """Copy a row's first `length` positions from slot `old` to slot `new` (every layer)."""
        for kc, vc in zip(self.k, self.v, strict=True):
            kc[new, :, :length].copy_(kc[old, :, :length])
            vc[new, :, :length].copy_(vc[old, :, :length])

    def write(self, slot: int, cache: Any) -> int:
        """Copy a prefilled row's DynamicCache (per layer keys/values [1, kv_heads, P, head_dim]) into
        `slot`; return P. The rest of the slot keeps stale values that no step reads before writing."""
        length = 0
        for i, layer in enumerate(cache.layers):
            keys, values = layer.keys, layer.values
            length = int(keys.shape[2])
            if length > self.max_len:
                raise RuntimeError(f"static KV cache: {length} tokens over max_len {self.max_len}")
            self.k[i][slot, :, :length].copy_(keys[0])
            self.v[i][slot, :, :length].copy_(values[0])
        return length


# --- the step (plain tensor code: torch.compile traces it whole) -----------------------------------------
def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    h = x.to(torch.float32)
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(x.dtype)


def _linear(
    x: torch.Tensor, lin: Linear, lora: Lora, rows: torch.Tensor, scale: torch.Tensor
) -> torch.Tensor:
    """x [B, 1, in] -> [B, 1, out]; with the row's stacked adapter as hf_lora adds it (slot 0: zeros)."""
    return _add_lora(x, F.linear(x, lin.weight, lin.bias), lora, rows, scale)


def _add_lora(
    x: torch.Tensor, out: torch.Tensor, lora: Lora, rows: torch.Tensor, scale: torch.Tensor
) -> torch.Tensor:
    """A Linear's output `out` [B, 1, out] for input x plus its rows' stacked adapter delta, cast back."""
    if lora is None:
        return out
    a, b = lora
    xa = torch.bmm(x.to(LORA_DTYPE), a.index_select(0, rows).transpose(1, 2))  # [B, 1, r]
    delta = torch.bmm(xa, b.index_select(0, rows).transpose(1, 2)) * scale  # [B, 1, out]
    return (out + delta).to(out.dtype)


def _projections(
    x: torch.Tensor,
    lin: tuple[Linear, ...],
    fused: Linear | None,
    group: tuple[int, ...],
    lo: tuple[Lora, ...],
    rows: torch.Tensor,
    scale: torch.Tensor,
) -> list[torch.Tensor]:
    """The outputs [B, 1, out_j] of the Linears `group` on x: one product on their fused weight when
    there is one (split into each Linear's block), else one product each; adapters per Linear."""
    if fused is None:
        return [_linear(x, lin[j], lo[j], rows, scale) for j in group]
    outs = F.linear(x, fused.weight, fused.bias).split([lin[j].weight.shape[0] for j in group], dim=-1)
    return [_add_lora(x, out, lo[j], rows, scale) for out, j in zip(outs, group, strict=True)]


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def decode_step(
    w: DecodeWeights,
    x: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    pos: torch.Tensor,
    mask: torch.Tensor,
    k_cache: list[torch.Tensor],
    v_cache: list[torch.Tensor],
    rows: torch.Tensor,
    scale: torch.Tensor,
    loras: tuple[Lora, ...],
) -> torch.Tensor:
    """One decode step for B rows in slots 0..B-1 -> logits [B, vocab] fp32.

    x [B, 1, hidden]: the tokens' embeddings; cos, sin [B, 1, head_dim]: the model's RoPE at `pos`;
    pos [B] long: where each row's token goes in its slot; mask [B, L] bool: True where the row attends
    (positions <= pos; L <= max_len); k_cache, v_cache: per layer [slots, kv_heads, max_len, head_dim],
    written in place; rows [B] long: each row's adapter slot (0: base); scale [B, 1, 1] fp32: its LoRA
    scale; loras: per Linear of module_names(), the stacked (A, B) or None.
    """
    b, length = x.shape[0], mask.shape[1]
    slots = torch.arange(b, device=x.device)
    attn_mask = mask[:, None, None, :]  # [B, 1, 1, L]
    cos4, sin4 = cos[:, None], sin[:, None]  # [B, 1, 1, head_dim], broadcast over heads
    per_layer = len(LINEARS)
    for i, layer in enumerate(w.layers):
        lo = loras[i * per_layer : (i + 1) * per_layer]
        lin = layer.linears
        h = _rms_norm(x, layer.input_norm, w.eps)
        q, k, v = _projections(h, lin, layer.qkv, (_Q, _K, _V), lo, rows, scale)
        q = q.view(b, 1, w.heads, w.head_dim).transpose(1, 2)
        k = k.view(b, 1, w.kv_heads, w.head_dim).transpose(1, 2)
        v = v.view(b, 1, w.kv_heads, w.head_dim).transpose(1, 2)
        q = (q * cos4) + (_rotate_half(q) * sin4)  # [B, heads, 1, head_dim]
        k = (k * cos4) + (_rotate_half(k) * sin4)  # [B, kv_heads, 1, head_dim]
        kc, vc = k_cache[i], v_cache[i]
        kc[slots, :, pos] = k[:, :, 0]  # [B, kv_heads, head_dim] into (slot b, position pos[b])
        vc[slots, :, pos] = v[:, :, 0]
        att = F.scaled_dot_product_attention(
            q,
            kc[:b, :, :length],
            vc[:b, :, :length],
            attn_mask=attn_mask,
            scale=w.scaling,
            enable_gqa=w.heads != w.kv_heads,
        )  # [B, heads, 1, head_dim]
        x = x + _linear(att.transpose(1, 2).reshape(b, 1, -1), lin[_O], lo[_O], rows, scale)
        h = _rms_norm(x, layer.post_norm, w.eps)
        gate, up = _projections(h, lin, layer.gate_up, (_GATE, _UP), lo, rows, scale)
        x = x + _linear(F.silu(gate) * up, lin[_DOWN], lo[_DOWN], rows, scale)
    h = _rms_norm(x, w.norm, w.eps)
    return _linear(h, w.head, loras[-1], rows, scale)[:, 0].float()
