"""Own forward pass for OPT and GPT-2: LayerNorm, learned positions, GELU/ReLU MLP, tied head,
every projection an `OWQLinear` called as `layer(x, slots)` (GPT-2's Conv1D already swapped).

OPT: positions offset by 2, optional project_in/out, `do_layer_norm_before` (pre- or post-norm).
GPT-2: c_attn's output split into q, k, v; optional 1/(layer+1) attention scaling. Built from a
loaded checkpoint model (its tensors and modules, never its forward). Knows nothing about
requests, scheduling or the adapter registry.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .kv_cache import CacheShape, KVCache, StepIndex, attention
from .layers import activation, fused_projection, layer_norm, prepare_layers, select_logits


@dataclass(frozen=True)
class BlockArgs:
    heads: int
    head_dim: int
    act: str
    pre_norm: bool
    scale: float


class NormMLPBlock(nn.Module):
    """One OPT / GPT-2 decoder block (fused or separate q/k/v; pre- or post-norm)."""

    def __init__(self, layer, names: dict, norms, args: BlockArgs, index: int, targets: dict):
        super().__init__()
        prefix = f"{names['blocks']}.{index}."
        self.qkv, _ = fused_projection(layer, prefix, names["qkv"], targets)  # one product
        self.out, _ = fused_projection(layer, prefix, names["out"], targets)
        self.fc1, _ = fused_projection(layer, prefix, names["fc1"], targets)
        self.fc2, _ = fused_projection(layer, prefix, names["fc2"], targets)
        self.norm1, self.norm2 = norms  # LayerNorm modules (weights read, forward never called)
        self.args, self.index = args, index
        self.act = activation(args.act)

    def _norm(self, x, ln):
        return layer_norm(x, ln.weight, ln.bias, ln.eps)

    def forward(self, x, step: StepIndex, mask, cache: KVCache, slots):
        # x: [B, T, E]; mask: [B, 1, T, L]
        b, t, _ = x.shape
        a = self.args
        h = self._norm(x, self.norm1) if a.pre_norm else x
        q, k, v = self.qkv(h, slots, step.decode).chunk(3, dim=-1)
        cache.write(self.index, k, v.contiguous(), step)
        keys, values = cache.read(self.index, step)
        q = q.reshape(b, t, a.heads, a.head_dim)
        x = x + self.out(attention(q, keys, values, mask, a.scale), slots, step.decode)
        if not a.pre_norm:
            x = self._norm(x, self.norm1)
        h = self._norm(x, self.norm2) if a.pre_norm else x
        x = x + self.fc2(self.act(self.fc1(h, slots, step.decode)), slots, step.decode)
        return x if a.pre_norm else self._norm(x, self.norm2)


class NormMLPRuntime(nn.Module):
    """forward(tokens [B, T], step, cache, slots [B] | None, logits) -> logits or None."""

    def __init__(self, parts: dict, blocks: list[NormMLPBlock], max_context: int, targets: dict):
        super().__init__()
        self.targets = targets  # stored layer name -> (fused OWQLinear, part)
        self.embed, self.pos_embed = parts["embed"], parts["pos_embed"]
        self.pos_offset = parts["pos_offset"]
        self.project_in, self.project_out = parts["project_in"], parts["project_out"]
        self.final_norm, self.head = parts["final_norm"], parts["head"]
        self.blocks = nn.ModuleList(blocks)
        a = blocks[0].args
        self.kv_heads, self.head_dim = a.heads, a.head_dim
        self.max_context = max_context

    def prepare(self, packed: bool = True) -> None:
        """Every projection's CPU plan in the compute dtype, with the 4-bit decode kernel where
        it applies (`kernels.cpu_ops`); before the first step."""
        prepare_layers(self, self.embed.dtype, packed)

    def cache_shape(self, rows: int) -> CacheShape:
        return CacheShape(
            len(self.blocks), rows, self.kv_heads, self.max_context, self.head_dim,
            self.embed.dtype, str(self.embed.device),
        )  # fmt: skip

    def forward(self, tokens, step: StepIndex, cache: KVCache, slots=None, logits: str = "last"):
        x = self.embed[tokens]  # [B, T, E_in]
        if self.project_in is not None:
            x = self.project_in(x)
        x = x + self.pos_embed[step.positions + self.pos_offset]
        for block in self.blocks:
            x = block(x, step, step.mask, cache, slots)
        if self.final_norm is not None:
            ln = self.final_norm
            x = layer_norm(x, ln.weight, ln.bias, ln.eps)
        if self.project_out is not None:
            x = self.project_out(x)
        return select_logits(x, self.head, logits)


OPT_NAMES = {
    "blocks": "model.decoder.layers",
    "qkv": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    "out": ("self_attn.out_proj",),
    "fc1": ("fc1",),
    "fc2": ("fc2",),
}
GPT2_NAMES = {
    "blocks": "transformer.h",
    "qkv": ("attn.c_attn",),
    "out": ("attn.c_proj",),
    "fc1": ("mlp.c_fc",),
    "fc2": ("mlp.c_proj",),
}


def _opt_block(layer, config, index: int, targets: dict) -> NormMLPBlock:
    heads = config.num_attention_heads
    head_dim = config.hidden_size // heads
    args = BlockArgs(
        heads, head_dim, config.activation_function, config.do_layer_norm_before, head_dim**-0.5
    )
    norms = (layer.self_attn_layer_norm, layer.final_layer_norm)
    return NormMLPBlock(layer, OPT_NAMES, norms, args, index, targets)


def build_opt(hf_model: nn.Module, max_context: int) -> NormMLPRuntime:
    config, decoder = hf_model.config, hf_model.model.decoder
    targets: dict = {}
    blocks = [_opt_block(layer, config, i, targets) for i, layer in enumerate(decoder.layers)]
    parts = {
        "embed": decoder.embed_tokens.weight,
        "pos_embed": decoder.embed_positions.weight,
        "pos_offset": 2,
        "project_in": decoder.project_in,
        "project_out": decoder.project_out,
        "final_norm": decoder.final_layer_norm,
        "head": hf_model.lm_head.weight,
    }
    return NormMLPRuntime(parts, blocks, max_context, targets)


def _gpt2_block(layer, config, index: int, targets: dict) -> NormMLPBlock:
    heads = config.n_head
    head_dim = config.n_embd // heads
    scale = head_dim**-0.5 if config.scale_attn_weights else 1.0
    if config.scale_attn_by_inverse_layer_idx:
        scale /= float(index + 1)
    args = BlockArgs(heads, head_dim, config.activation_function, True, scale)
    norms = (layer.ln_1, layer.ln_2)
    return NormMLPBlock(layer, GPT2_NAMES, norms, args, index, targets)


def build_gpt2(hf_model: nn.Module, max_context: int) -> NormMLPRuntime:
    config, body = hf_model.config, hf_model.transformer
    targets: dict = {}
    blocks = [_gpt2_block(layer, config, i, targets) for i, layer in enumerate(body.h)]
    parts = {
        "embed": body.wte.weight,
        "pos_embed": body.wpe.weight,
        "pos_offset": 0,
        "project_in": None,
        "project_out": None,
        "final_norm": body.ln_f,
        "head": hf_model.lm_head.weight,
    }
    with torch.no_grad():
        return NormMLPRuntime(parts, blocks, max_context, targets)
