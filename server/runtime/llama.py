"""Own forward pass for the Llama family (Llama, Mistral, Qwen2, Qwen3, SmolLM): RMSNorm, RoPE,
GQA, gated MLP, optional per-head q/k norms, tied or separate head; every projection an
`OWQLinear` called as `layer(x, slots, fast)`, q/k/v and gate/up fused.

Built from a checkpoint's tensors (`Weights`) by the names of its `Family` entry; never builds or
calls a transformers model. Knows nothing about requests, scheduling or the adapter registry.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from owq.kernels.cpu_decode import DecodeStack
from owq.kernels.families import Family

from .kv_cache import KVCache, StepIndex, attention, group_mask
from .layers import (
    Runtime,
    activation,
    apply_rope,
    rms_norm,
    rope_inv_freq,
    rope_tables,
)
from .vocab import Vocab
from .weights import Weights

# Prompt steps of up to this many tokens (rows × tokens) take the compiled step: it skips the
# eager blocks' ~60 ops a block, which is most of a short prompt's time (10 tokens of SmolLM2:
# 21.6 against 31.5 ms, 2 cores). Past ~100 tokens the eager blocks win (SDPA, one GEMM for the
# weak columns; 256 tokens: 421 against 468 ms).
FUSED_PROMPT_ROWS = 64


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
    def __init__(self, w: Weights, family: Family, args: LlamaArgs, index: int):
        super().__init__()
        prefix = f"{family.blocks}.{index}."
        self.qkv, self.qkv_sizes = w.linears(prefix, family.attention_in)  # [q, k, v]
        self.qk_size = self.qkv_sizes[0] + self.qkv_sizes[1]
        self.o, _ = w.linears(prefix, (family.attention_out,))
        self.gate_up, self.mlp_sizes = w.linears(prefix, family.mlp_in)  # [gate, up]
        self.down, _ = w.linears(prefix, (family.mlp_out,))
        self.attn_norm = w.tensor(f"{prefix}{family.norms[0]}.weight")
        self.mlp_norm = w.tensor(f"{prefix}{family.norms[1]}.weight")
        self.qk_norms = None
        if family.qk_norms is not None:
            self.qk_norms = [w.tensor(f"{prefix}{n}.weight") for n in family.qk_norms]
        self.args, self.index = args, index
        self.act = activation(args.act)
        self.scale = args.head_dim**-0.5

    def _qk(self, qk: torch.Tensor, rope) -> tuple[torch.Tensor, torch.Tensor]:
        # qk: [B, T, Hq + Hkv, D] -> rotated q [B, T, Hq, D], k [B, T, Hkv, D]
        a = self.args
        if self.qk_norms is not None:
            q, k = qk.split([a.heads, a.kv_heads], dim=2)
            q_norm, k_norm = self.qk_norms
            qk = torch.cat([rms_norm(q, q_norm, a.eps), rms_norm(k, k_norm, a.eps)], dim=2)
        qk = apply_rope(qk, *rope)  # q, k at once; sliced, not split: fewer ops per step
        return qk[:, :, : a.heads], qk[:, :, a.heads :]

    def forward(self, x, rope, step: StepIndex, mask, cache: KVCache, slots):
        # x: [B, T, E]; rope: (cos, sin) [B, T, 1, D]; mask: [B, 1, G*T, L]
        b, t, _ = x.shape
        a = self.args
        h = rms_norm(x, self.attn_norm, a.eps)
        qkv = self.qkv(h, slots, step.fast)
        qk, v = qkv[..., : self.qk_size], qkv[..., self.qk_size :]
        q, k = self._qk(qk.view(b, t, a.heads + a.kv_heads, a.head_dim), rope)
        cache.write(self.index, k, v, step)
        keys, values = cache.read(self.index, step)  # [B, Hkv, L, D]
        x = x + self.o(attention(q, keys, values, mask, self.scale), slots, step.fast)
        h = rms_norm(x, self.mlp_norm, a.eps)
        gate_up = self.gate_up(h, slots, step.fast)
        gate, up = gate_up[..., : self.mlp_sizes[0]], gate_up[..., self.mlp_sizes[0] :]
        return x + self.down(self.act(gate) * up, slots, step.fast)


class LlamaRuntime(Runtime):
    """forward(tokens [B, T], step, cache, slots [B] | None, logits) -> logits or None."""

    def __init__(self, config, family: Family, w: Weights, max_context: int):
        super().__init__()
        self.args = a = LlamaArgs.from_config(config)
        self.vocab = Vocab(w, family, config)
        self.blocks = nn.ModuleList(LlamaBlock(w, family, a, i) for i in range(a.layers))
        self.norm = w.tensor(f"{family.final_norm}.weight")
        self.targets = w.targets
        inv_freq, scaling = rope_inv_freq(config, a.head_dim)
        cos, sin = rope_tables(inv_freq, scaling, max_context)
        self.cos = cos.to(self.vocab.device, self.vocab.dtype)
        self.sin = sin.to(self.vocab.device, self.vocab.dtype)
        self.max_context = max_context
        self.fused: DecodeStack | None = None

    def fuse_decode(self) -> None:
        """The compiled step (`kernels.cpu_decode`) over every block, for decode and prompt
        steps on the fast path, where the model is on the CPU in fp32 with SiLU (per-head q/k
        norms or none), and every projection on the 4-bit kernel."""
        self.fused = None
        a = self.args
        plain = a.act in ("silu", "swish")
        if not plain or self.vocab.device.type != "cpu" or self.vocab.dtype != torch.float32:
            return
        layers, norms, qk_norms = [], [], []
        for b in self.blocks:
            layers += [b.qkv, b.o, b.gate_up, b.down]
            norms += [b.attn_norm, b.mlp_norm]
            qk_norms += b.qk_norms or []
        self.fused = DecodeStack.build(
            layers, norms, qk_norms, self.cos, self.sin, a.heads, a.kv_heads, a.head_dim, a.eps
        )

    def _fused_step(self, x, step: StepIndex, cache: KVCache, slots):
        """x [B, T, E] through every block in one compiled call, or None (the eager blocks): a
        fast step, decode or a prompt of up to FUSED_PROMPT_ROWS tokens, each of its B·T tokens
        a row of the compiled step in its sequence's cache row. A step that scores its prompt
        (not fast) runs the eager blocks."""
        b, t, e = x.shape
        if self.fused is None or not step.fast or torch.is_grad_enabled():
            return None
        if not step.decode and b * t > FUSED_PROMPT_ROWS:
            return None
        rows = torch.arange(step.row0, step.row0 + b).repeat_interleave(t)
        slots = None if slots is None else slots.repeat_interleave(t)
        out = self.fused.step(x.reshape(b * t, e), step.positions, rows, cache.k, cache.v, slots)
        return None if out is None else out.view(b, t, e)

    def cache_dims(self) -> tuple[int, int, int]:
        a = self.args
        return a.layers, a.kv_heads, a.head_dim

    def forward(self, tokens, step: StepIndex, cache: KVCache, slots=None, logits: str = "last"):
        x = self.vocab.embed(tokens)  # [B, T, E]
        fused = self._fused_step(x, step, cache, slots)
        if fused is not None:
            return self.vocab.logits(rms_norm(fused, self.norm, self.args.eps), logits, True)
        pos = step.positions
        rope = (self.cos[pos].unsqueeze(2), self.sin[pos].unsqueeze(2))  # [B, T, 1, D]
        mask = group_mask(step.mask, self.args.heads // self.args.kv_heads)
        for block in self.blocks:
            x = block(x, rope, step, mask, cache, slots)
        return self.vocab.logits(rms_norm(x, self.norm, self.args.eps), logits, step.fast)
