"""Own model runtimes (no transformers forward): one per architecture family, same interface.

`build_runtime(hf_model, max_context)` takes a model loaded by `kernels.checkpoint.load_checkpoint`
and returns a module with `forward(tokens, step, cache, slots, logits)` and `cache_shape(rows)`.
"""

from __future__ import annotations

from torch import nn

from .kv_cache import CacheShape, KVCache, StepIndex, step_index
from .llama import build_llama
from .opt_gpt2 import build_gpt2, build_opt

BUILDERS = {
    "llama": build_llama,
    "mistral": build_llama,
    "qwen2": build_llama,
    "opt": build_opt,
    "gpt2": build_gpt2,
}


def context_limit(config) -> int:
    """The longest sequence the architecture can attend over (positions table, sliding window)."""
    limit = getattr(config, "max_position_embeddings", None) or config.n_positions
    window = getattr(config, "sliding_window", None)
    return min(limit, window) if window else limit


def build_runtime(hf_model: nn.Module, max_context: int) -> nn.Module:
    model_type = hf_model.config.model_type
    if model_type not in BUILDERS:
        raise ValueError(f"no runtime for model_type={model_type!r}; supported: {sorted(BUILDERS)}")
    return BUILDERS[model_type](hf_model, min(max_context, context_limit(hf_model.config)))


__all__ = ["CacheShape", "KVCache", "StepIndex", "build_runtime", "context_limit", "step_index"]
