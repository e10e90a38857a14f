"""Small pure building blocks of the model runtimes: norms, rotary tables, activations, logits.

Each matches the transformers implementation it replaces to fp32 rounding. Knows nothing about
caches, requests or adapters.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from owq.kernels import OWQLinear
from owq.kernels.owq_vocab import OWQEmbedding

from .heap import trim_heap
from .kv_cache import CacheShape


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x: [..., D]; normalised in fp32 like LlamaRMSNorm, in its order of operations, weight
    applied in x's dtype. Written out: on the CPU `F.rms_norm` is a composite of more ops (a
    division among them) and was slower per decode step."""
    if x.dtype == torch.float32:
        return (x * x.pow(2).mean(-1, keepdim=True).add_(eps).rsqrt_()).mul_(weight)
    h = x.float()
    h = h * h.pow(2).mean(-1, keepdim=True).add_(eps).rsqrt_()
    return weight * h.to(x.dtype)


def layer_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float):
    return F.layer_norm(x, (x.shape[-1],), weight, bias, eps)


def _gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    return F.gelu(x, approximate="tanh")


def _gelu_new(x: torch.Tensor) -> torch.Tensor:
    """GPT-2's "gelu_new", written out as transformers' NewGELUActivation."""
    c = math.sqrt(2.0 / math.pi)
    return 0.5 * x * (1.0 + torch.tanh(c * (x + 0.044715 * torch.pow(x, 3.0))))


ACTIVATIONS = {
    "silu": F.silu,
    "swish": F.silu,
    "relu": F.relu,
    "gelu": F.gelu,
    "gelu_new": _gelu_new,
    "gelu_fast": _gelu_tanh,
    "gelu_pytorch_tanh": _gelu_tanh,
}


def activation(name: str):
    if name not in ACTIVATIONS:
        raise ValueError(f"unsupported activation {name!r}; supported: {sorted(ACTIVATIONS)}")
    return ACTIVATIONS[name]


def default_inv_freq(theta: float, dim: int) -> torch.Tensor:
    """[dim/2] inverse frequencies of the original RoPE."""
    return 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))


def rope_inv_freq(config, head_dim: int) -> tuple[torch.Tensor, float]:
    """(inv_freq [head_dim/2], attention_scaling) exactly as transformers derives them.

    Scaled types (linear, llama3, yarn, ...) use transformers' own init functions on the config;
    `dynamic` (frequencies that change with the sequence length) is refused.
    """
    params = getattr(config, "rope_parameters", None) or {}
    rope_type = params.get("rope_type", "default")
    if rope_type == "default":
        theta = params.get("rope_theta", getattr(config, "rope_theta", 10000.0))
        return default_inv_freq(float(theta), head_dim), 1.0
    if rope_type == "dynamic":
        raise ValueError("rope_type 'dynamic' changes with the sequence length: not supported")
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    inv_freq, scaling = ROPE_INIT_FUNCTIONS[rope_type](config, "cpu")
    return inv_freq.float(), float(scaling)


def rope_tables(inv_freq: torch.Tensor, scaling: float, max_context: int):
    """(cos, signed sin) [max_context, head_dim] for positions 0 .. max_context-1; the sin's
    first half is negated, so that rotate_half(x)·sin = roll(x, D/2)·signed sin."""
    positions = torch.arange(max_context, dtype=torch.float32)
    freqs = positions[:, None] * inv_freq[None, :]
    emb = torch.cat((freqs, freqs), dim=-1)
    sign = torch.ones(emb.shape[-1])
    sign[: emb.shape[-1] // 2] = -1.0
    return emb.cos() * scaling, emb.sin() * scaling * sign


def apply_rope(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
    """x: [B, T, H, D]; cos, signed_sin: [B, T, 1, D] (rows of `rope_tables` at each token's
    position): x·cos + rotate_half(x)·sin in three ops (the halves swapped by one flip, which
    copies once where `roll` slices and concatenates)."""
    swapped = x.unflatten(-1, (2, -1)).flip(-2).flatten(-2)
    return torch.addcmul(x * cos, swapped, signed_sin)


def prepare_layers(
    module: nn.Module, dtype: torch.dtype, int4: bool = True, resident: bool = False
) -> None:
    """Build every OWQLinear's CPU plan in `dtype` (no-op off the CPU): the 4-bit decode kernel
    where it applies, a resident dense copy only when asked (else prefill dequantizes per call)."""
    for layer in module.modules():
        looked_up = isinstance(layer, OWQEmbedding)  # rows are gathered, never multiplied
        if isinstance(layer, OWQLinear) and not looked_up and not layer.qweight.is_cuda:
            layer.prepare(dtype, int4, resident)
            trim_heap()  # else each layer's freed temporaries pile up under the kept codes


class Runtime(nn.Module):
    """What every model runtime shares: its vocabulary, its layers' CPU plans and its KV cache
    shape. Subclasses set `vocab` (`vocab.Vocab`), `max_context`, and `cache_dims()` ->
    (layers, kv_heads, head_dim)."""

    def prepare(self, packed: bool = True, resident: bool = False) -> None:
        """Every projection's CPU plan in the compute dtype (`kernels.cpu_ops`): the 4-bit decode
        kernel where it applies (`packed`), a resident fp32 copy only if `resident`."""
        prepare_layers(self, self.vocab.dtype, packed, resident)
        self.fuse_decode()

    def fuse_decode(self) -> None:
        """Build the fused decode step where the runtime has one (after the layers' plans)."""

    def cache_shape(self, rows: int) -> CacheShape:
        layers, kv_heads, head_dim = self.cache_dims()
        return CacheShape(
            layers, rows, kv_heads, self.max_context, head_dim, self.vocab.dtype,
            str(self.vocab.device),
        )  # fmt: skip
