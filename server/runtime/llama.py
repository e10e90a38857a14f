"""Own forward pass for the Llama family (Llama, Mistral, Qwen2, SmolLM): RMSNorm, RoPE, GQA,
gated MLP, tied or separate head, every projection an `OWQLinear` called as `layer(x, slots)`.

Built from a loaded checkpoint model (takes its tensors and OWQLinear modules, never calls its
forward). Knows nothing about requests, scheduling or the adapter registry.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .kv_cache import CacheShape, KVCache, StepIndex, attention, group_mask
from .layers import (
    activation,
    apply_rope,
    fused_projection,
    prepare_layers,
    rms_norm,
    rope_inv_freq,
    rope_tables,
    select_logits,
)


@dataclass(frozen=True)
class LlamaArgs:
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    eps: float
    act: str
    max_positions: int

    @classmethod
    def from_config(cls, config) -> LlamaArgs:
        heads = config.num_attention_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        return cls(
            layers=config.num_hidden_layers,
            heads=heads,
            kv_heads=getattr(config, "num_key_value_heads", None) or heads,
            head_dim=head_dim,
            eps=config.rms_norm_eps,
            act=config.hidden_act,
            max_positions=config.max_position_embeddings,
        )


class LlamaBlock(nn.Module):
    def __init__(self, hf_layer: nn.Module, args: LlamaArgs, index: int, targets: dict):
        super().__init__()
        prefix = f"model.layers.{index}."
        attn_names = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")
        self.qkv, self.qkv_sizes = fused_projection(hf_layer, prefix, attn_names, targets)
        self.qk_size = self.qkv_sizes[0] + self.qkv_sizes[1]
        self.o, _ = fused_projection(hf_layer, prefix, ("self_attn.o_proj",), targets)
        mlp_names = ("mlp.gate_proj", "mlp.up_proj")
        self.gate_up, self.gate_up_sizes = fused_projection(hf_layer, prefix, mlp_names, targets)
        self.down, _ = fused_projection(hf_layer, prefix, ("mlp.down_proj",), targets)
        self.attn_norm = hf_layer.input_layernorm.weight
        self.mlp_norm = hf_layer.post_attention_layernorm.weight
        self.args, self.index = args, index
        self.act = activation(args.act)
        self.scale = args.head_dim**-0.5

    def forward(self, x, rope, step: StepIndex, mask, cache: KVCache, slots):
        # x: [B, T, E]; rope: (cos, sin) [B, T, 1, D]; mask: [B, 1, G*T, L]
        b, t, _ = x.shape
        a = self.args
        h = rms_norm(x, self.attn_norm, a.eps)
        qk, v = self.qkv(h, slots, step.decode).split([self.qk_size, self.qkv_sizes[2]], dim=-1)
        qk = apply_rope(qk.view(b, t, a.heads + a.kv_heads, a.head_dim), *rope)  # q, k at once
        q, k = qk.split([a.heads, a.kv_heads], dim=2)
        cache.write(self.index, k, v, step)
        keys, values = cache.read(self.index, step)  # [B, Hkv, L, D]
        x = x + self.o(attention(q, keys, values, mask, self.scale), slots, step.decode)
        h = rms_norm(x, self.mlp_norm, a.eps)
        gate, up = self.gate_up(h, slots, step.decode).split(self.gate_up_sizes, dim=-1)
        return x + self.down(self.act(gate) * up, slots, step.decode)


class LlamaRuntime(nn.Module):
    """forward(tokens [B, T], step, cache, slots [B] | None, logits) -> logits or None."""

    def __init__(self, hf_model: nn.Module, max_context: int):
        super().__init__()
        config = hf_model.config
        self.args = a = LlamaArgs.from_config(config)
        self.embed = hf_model.model.embed_tokens.weight
        self.targets: dict = {}  # stored layer name -> (fused OWQLinear, part)
        self.blocks = nn.ModuleList(
            LlamaBlock(layer, a, i, self.targets) for i, layer in enumerate(hf_model.model.layers)
        )
        self.norm = hf_model.model.norm.weight
        self.head = hf_model.lm_head.weight
        inv_freq, scaling = rope_inv_freq(config, a.head_dim)
        cos, sin = rope_tables(inv_freq, scaling, max_context)
        self.cos, self.sin = cos.to(self.embed), sin.to(self.embed)
        self.max_context = max_context

    def prepare(self, packed: bool = True) -> None:
        """Every projection's CPU plan in the compute dtype, with the 4-bit decode kernel where
        it applies (`kernels.cpu_ops`); before the first step."""
        prepare_layers(self, self.embed.dtype, packed)

    def cache_shape(self, rows: int) -> CacheShape:
        a = self.args
        return CacheShape(
            a.layers, rows, a.kv_heads, self.max_context, a.head_dim, self.embed.dtype,
            str(self.embed.device),
        )  # fmt: skip

    def forward(self, tokens, step: StepIndex, cache: KVCache, slots=None, logits: str = "last"):
        x = self.embed[tokens]  # [B, T, E]
        pos = step.positions
        rope = (self.cos[pos].unsqueeze(2), self.sin[pos].unsqueeze(2))  # [B, T, 1, D]
        mask = group_mask(step.mask, self.args.heads // self.args.kv_heads)
        for block in self.blocks:
            x = block(x, rope, step, mask, cache, slots)
        return select_logits(rms_norm(x, self.norm, self.args.eps), self.head, logits)


def build_llama(hf_model: nn.Module, max_context: int) -> LlamaRuntime:
    with torch.no_grad():
        return LlamaRuntime(hf_model, max_context)
