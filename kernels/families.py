"""Model-family table: where the blocks, linears, embeddings and head of a causal LM live.

Found from `config.model_type` by exact lookup (never a name substring). Shared by the quantizer
(block-by-block driver, true-sequential groups) and the checkpoint loader; knows no algorithms.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class Family:
    """Module paths of one architecture family, relative to the `*ForCausalLM` model."""

    name: str
    blocks: str  # nn.ModuleList of decoder blocks
    groups: tuple[tuple[str, ...], ...]  # linears of one block, execution order, true-seq groups
    embeddings: tuple[str, ...]  # run before block 0
    final_norm: str
    head: str
    conv1d: bool = False  # GPT-2: weights stored [in, out]

    @property
    def linears(self) -> tuple[str, ...]:
        return tuple(name for group in self.groups for name in group)


LLAMA = Family(
    name="llama",
    blocks="model.layers",
    groups=(
        ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
        ("self_attn.o_proj",),
        ("mlp.gate_proj", "mlp.up_proj"),
        ("mlp.down_proj",),
    ),
    embeddings=("model.embed_tokens",),
    final_norm="model.norm",
    head="lm_head",
)

OPT = Family(
    name="opt",
    blocks="model.decoder.layers",
    groups=(
        ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
        ("self_attn.out_proj",),
        ("fc1",),
        ("fc2",),
    ),
    embeddings=("model.decoder.embed_tokens", "model.decoder.embed_positions"),
    final_norm="model.decoder.final_layer_norm",
    head="lm_head",
)

GPT2 = Family(
    name="gpt2",
    blocks="transformer.h",
    groups=(("attn.c_attn",), ("attn.c_proj",), ("mlp.c_fc",), ("mlp.c_proj",)),
    embeddings=("transformer.wte", "transformer.wpe"),
    final_norm="transformer.ln_f",
    head="lm_head",
    conv1d=True,
)

FAMILIES: dict[str, Family] = {
    "llama": LLAMA,
    "mistral": LLAMA,
    "qwen2": LLAMA,
    "opt": OPT,
    "gpt2": GPT2,
}


def family_of(config) -> Family:
    """The family of a transformers config, or ValueError naming the supported model types."""
    model_type = getattr(config, "model_type", None)
    if model_type not in FAMILIES:
        raise ValueError(
            f"unsupported architecture model_type={model_type!r}; "
            f"supported: {', '.join(sorted(FAMILIES))}"
        )
    return FAMILIES[model_type]


def set_module(root: nn.Module, path: str, module: nn.Module) -> None:
    parent, _, leaf = path.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, leaf, module)


def blocks_of(model: nn.Module, family: Family) -> nn.ModuleList:
    return model.get_submodule(family.blocks)


def quantized_linear_paths(model: nn.Module, family: Family) -> list[str]:
    """Full paths of every quantizable linear, block by block in execution order."""
    count = len(blocks_of(model, family))
    return [f"{family.blocks}.{i}.{name}" for i in range(count) for name in family.linears]


def linear_shape(module: nn.Module) -> tuple[int, int]:
    """(in_features, out_features) of an nn.Linear or a GPT-2 Conv1D."""
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    weight = module.weight  # Conv1D: [in, out]
    return weight.shape[0], weight.shape[1]


def linear_weight(module: nn.Module) -> torch.Tensor:
    """The weight as [out, in] (nn.Linear layout), transposing GPT-2's Conv1D."""
    if isinstance(module, nn.Linear):
        return module.weight.data
    return module.weight.data.t()
