"""The LoRA baseline WCT is measured against: `peft` LoRA on every linear of a block.

On a float model peft wraps `nn.Linear` as usual. On an OWQ model it wraps our `OWQLinear` through
peft's custom-module registration (`LoraConfig._register_custom_module`, experimental in peft):
peft's own `lora.Linear` runs the base layer's forward (dense codes + weak columns, frozen) and
adds B·A·x; this needs only `in_features`/`out_features` on the base layer. The rank whose
trainable-parameter count is closest to a WCT budget is `rank_for_budget`. Targets come from the
Family table. Benchmark-only: imports `peft` lazily; knows nothing about adapters on disk.
"""

from __future__ import annotations

import warnings
from pathlib import Path

from torch import nn

from owq.kernels.families import family_of, linear_shape, quantized_linear_paths
from owq.kernels.owq_linear import OWQLinear


def lora_targets(model: nn.Module) -> list[str]:
    """peft target_modules: the block-relative paths of the family's linears."""
    return list(family_of(model.config).linears)


def lora_params_per_rank(model: nn.Module) -> int:
    """Trainable parameters of rank-1 LoRA on every quantizable linear: Σ (in + out)."""
    family = family_of(model.config)
    total = 0
    for path in quantized_linear_paths(model, family):
        module = model.get_submodule(path)
        if hasattr(module, "in_features"):  # nn.Linear, OWQLinear, a peft-wrapped layer
            total += module.in_features + module.out_features
        else:  # GPT-2 Conv1D
            total += sum(linear_shape(module))
    return total


def rank_for_budget(model: nn.Module, params: int) -> int:
    """The LoRA rank whose trainable-parameter count is closest to `params` (at least 1)."""
    return max(1, round(params / lora_params_per_rank(model)))


def wrap_lora(model: nn.Module, rank: int, alpha: float | None = None, seed: int = 0):
    """A peft model with LoRA (rank r, alpha 2r unless given, no dropout) on every linear."""
    import torch
    from peft import LoraConfig, get_peft_model
    from peft.tuners.lora.layer import Linear as LoraLinear

    config = LoraConfig(
        r=rank,
        lora_alpha=alpha if alpha is not None else 2 * rank,
        lora_dropout=0.0,
        target_modules=lora_targets(model),
        bias="none",
    )
    if any(isinstance(m, OWQLinear) for m in model.modules()):
        config._register_custom_module({OWQLinear: LoraLinear})
    torch.manual_seed(seed)
    with warnings.catch_warnings():  # peft warns about any registered custom layer type
        warnings.filterwarnings("ignore", message="Unsupported layer type")
        return get_peft_model(model, config)


def trainable(model: nn.Module) -> list[nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def save_lora(peft_model, out_dir: str | Path) -> int:
    """peft's own format (adapter_config.json + adapter_model.safetensors); bytes on disk."""
    out = Path(out_dir)
    peft_model.save_pretrained(out)
    return sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
