"""Own forward pass for OPT and GPT-2: LayerNorm, learned positions, GELU/ReLU MLP, tied head,
every projection an `OWQLinear` called as `layer(x, slots, fast)` (q/k/v fused; GPT-2's c_attn
is one stored layer already).

What differs between the two is read from the config: pre- or post-norm (`do_layer_norm_before`),
attention scaling (`scale_attn_weights`, 1/(layer+1) by `scale_attn_by_inverse_layer_idx`), the
LayerNorm epsilon; OPT's position offset and optional project_in/out come from its `Family`
entry. Built from a checkpoint's tensors (`Weights`); never builds or calls a transformers model.
Knows nothing about requests, scheduling or the adapter registry.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from owq.kernels.families import Family

from .kv_cache import KVCache, StepIndex, attention
from .layers import Runtime, activation, layer_norm
from .vocab import Vocab
from .weights import Weights


@dataclass(frozen=True)
class BlockArgs:
    heads: int
    head_dim: int
    act: str
    pre_norm: bool
    eps: float

    @classmethod
    def from_config(cls, config) -> BlockArgs:
        heads = config.num_attention_heads
        return cls(
            heads=heads,
            head_dim=config.hidden_size // heads,
            act=config.activation_function,
            pre_norm=getattr(config, "do_layer_norm_before", True),
            eps=getattr(config, "layer_norm_epsilon", 1e-5),
        )

    def scale(self, config, index: int) -> float:
        scale = self.head_dim**-0.5 if getattr(config, "scale_attn_weights", True) else 1.0
        if getattr(config, "scale_attn_by_inverse_layer_idx", False):
            scale /= float(index + 1)
        return scale


def _norm(w: Weights, path: str, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(weight, bias) of a LayerNorm; ones/zeros where it has no affine part stored."""
    weight = w.optional(f"{path}.weight")
    bias = w.optional(f"{path}.bias")
    ones = torch.ones(width, dtype=w.dtype, device=w.device)
    return (ones if weight is None else weight), (torch.zeros_like(ones) if bias is None else bias)


class NormMLPBlock(nn.Module):
    """One OPT / GPT-2 decoder block (pre- or post-norm)."""

    def __init__(self, w: Weights, family: Family, config, args: BlockArgs, index: int):
        super().__init__()
        prefix = f"{family.blocks}.{index}."
        self.qkv, _ = w.linears(prefix, family.attention_in)  # one product
        self.out, _ = w.linears(prefix, (family.attention_out,))
        self.fc1, _ = w.linears(prefix, family.mlp_in)
        self.fc2, _ = w.linears(prefix, (family.mlp_out,))
        width = self.out.out_features
        self.norm1 = _norm(w, prefix + family.norms[0], width)
        self.norm2 = _norm(w, prefix + family.norms[1], width)
        self.args, self.index = args, index
        self.scale = args.scale(config, index)
        self.act = activation(args.act)

    def forward(self, x, step: StepIndex, mask, cache: KVCache, slots):
        # x: [B, T, E]; mask: [B, 1, T, L]
        b, t, _ = x.shape
        a = self.args
        h = layer_norm(x, *self.norm1, a.eps) if a.pre_norm else x
        q, k, v = self.qkv(h, slots, step.fast).chunk(3, dim=-1)
        cache.write(self.index, k, v.contiguous(), step)
        keys, values = cache.read(self.index, step)
        q = q.reshape(b, t, a.heads, a.head_dim)
        x = x + self.out(attention(q, keys, values, mask, self.scale), slots, step.fast)
        if not a.pre_norm:
            x = layer_norm(x, *self.norm1, a.eps)
        h = layer_norm(x, *self.norm2, a.eps) if a.pre_norm else x
        x = x + self.fc2(self.act(self.fc1(h, slots, step.fast)), slots, step.fast)
        return x if a.pre_norm else layer_norm(x, *self.norm2, a.eps)


class NormMLPRuntime(Runtime):
    """forward(tokens [B, T], step, cache, slots [B] | None, logits) -> logits or None."""

    def __init__(self, config, family: Family, w: Weights, max_context: int):
        super().__init__()
        self.args = a = BlockArgs.from_config(config)
        self.vocab = Vocab(w, family, config)
        self.pos_embed = w.tensor(f"{family.positions}.weight")
        self.pos_offset = family.position_offset
        self.project_in = self._optional(w, family.project_in)
        self.project_out = self._optional(w, family.project_out)
        blocks = range(config.num_hidden_layers)
        self.blocks = nn.ModuleList(NormMLPBlock(w, family, config, a, i) for i in blocks)
        self.final_norm = None
        if w.has(f"{family.final_norm}.weight") or w.has(f"{family.final_norm}.bias"):
            self.final_norm = _norm(w, family.final_norm, config.hidden_size)
        self.targets = w.targets
        self.max_context = max_context

    @staticmethod
    def _optional(w: Weights, path: str | None) -> torch.Tensor | None:
        return None if path is None else w.optional(f"{path}.weight")

    def cache_dims(self) -> tuple[int, int, int]:
        return len(self.blocks), self.args.heads, self.args.head_dim

    def forward(self, tokens, step: StepIndex, cache: KVCache, slots=None, logits: str = "last"):
        x = self.vocab.embed(tokens)  # [B, T, E_in]
        if self.project_in is not None:
            x = x @ self.project_in.t()
        x = x + self.pos_embed[step.positions + self.pos_offset]
        for block in self.blocks:
            x = block(x, step, step.mask, cache, slots)
        if self.final_norm is not None:
            x = layer_norm(x, *self.final_norm, self.args.eps)
        if self.project_out is not None:
            x = x @ self.project_out.t()
        return self.vocab.logits(x, logits, step.fast)
