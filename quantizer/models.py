"""Resolve a MODEL argument to (model, tokenizer): `default`, an HF dir, a GGUF or a checkpoint."""

from __future__ import annotations

from pathlib import Path

import torch

from owq.builtin.model import display_name, load_float_model
from owq.kernels.checkpoint import is_checkpoint, load_checkpoint


def load_model(model: str, dtype: torch.dtype = torch.float32):
    """(model, tokenizer, name); an owq checkpoint dir loads quantized, anything else as float."""
    from transformers import AutoTokenizer

    if Path(model).is_dir() and is_checkpoint(model):
        return (
            load_checkpoint(model, dtype),
            AutoTokenizer.from_pretrained(model),
            display_name(model),
        )
    lm, tokenizer = load_float_model(model)
    return lm.to(dtype), tokenizer, display_name(model)
