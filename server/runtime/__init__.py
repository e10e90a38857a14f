"""Own model runtimes (no transformers forward): one per runtime kind of the `Family` table.

`build_runtime(config, tensors, max_context, ...)` builds the runtime of a checkpoint's config and
tensors (`kernels.checkpoint.read_checkpoint`) and returns a module with
`forward(tokens, step, cache, slots, logits)`, `cache_shape(rows)`, `prepare(packed)` and
`targets` (stored layer name -> (runtime layer, part), where adapters are written).
"""

from __future__ import annotations

import torch
from torch import nn

from owq.kernels.families import family_of

from .kv_cache import CacheShape, KVCache, StepIndex, step_index
from .llama import LlamaRuntime
from .norm_mlp import NormMLPRuntime
from .weights import Weights

RUNTIMES = {"llama": LlamaRuntime, "norm_mlp": NormMLPRuntime}


def context_limit(config) -> int:
    """The longest sequence the architecture can attend over (positions table, sliding window)."""
    limit = getattr(config, "max_position_embeddings", None) or config.n_positions
    window = getattr(config, "sliding_window", None)
    return min(limit, window) if window else limit


def build_runtime(
    config,
    tensors: dict[str, torch.Tensor],
    max_context: int,
    *,
    num_slots: int = 0,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    table_dtype: torch.dtype | None = None,
) -> nn.Module:
    """The runtime of `config.model_type` over `tensors` (a checkpoint's, or a quantized model's
    state dict), attending over at most `max_context` tokens (capped by the model's own limit),
    with `num_slots` adapter slots in every layer's slot table."""
    family = family_of(config)
    weights = Weights(tensors, dtype, device, num_slots, table_dtype)
    with torch.no_grad():
        return RUNTIMES[family.runtime](
            config, family, weights, min(max_context, context_limit(config))
        )


__all__ = [
    "CacheShape",
    "KVCache",
    "RUNTIMES",
    "StepIndex",
    "build_runtime",
    "context_limit",
    "step_index",
]
