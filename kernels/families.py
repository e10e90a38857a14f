"""The architecture table: where the blocks, linears, norms, embeddings and head of a causal LM
live, and which runtime runs it. One entry per `config.model_type` (exact lookup, never a name
substring); the quantizer (block-by-block driver, true-sequential groups), weak column tuning
(attention / MLP scopes), the checkpoint loader and the server's runtime (built from a
checkpoint's tensors by these names) all read it. Adding an architecture is one entry here plus
what is truly new about it in its runtime. Knows no algorithms and no runtime code: `runtime`
names the server's builder.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from torch import nn


@dataclass(frozen=True)
class Family:
    """Module paths of one architecture, relative to the `*ForCausalLM` model (linears and norms
    relative to a block)."""

    runtime: str  # the server runtime that runs it: "llama" | "norm_mlp"
    blocks: str  # nn.ModuleList of decoder blocks
    attention_in: tuple[str, ...]  # linears reading the attention input, in output order
    attention_out: str
    mlp_in: tuple[str, ...]  # linears reading the MLP input, in output order
    mlp_out: str
    norms: tuple[str, str]  # the block's norms before attention and before the MLP
    embed: str
    final_norm: str
    head: str = "lm_head"
    positions: str | None = None  # a learned position table
    position_offset: int = 0  # OPT looks its positions up at +2
    qk_norms: tuple[str, str] | None = None  # per-head RMSNorm of q and k (Qwen3)
    project_in: str | None = None  # OPT: embeddings narrower than the blocks (when stored)
    project_out: str | None = None
    conv1d: bool = False  # GPT-2: linear weights stored [in, out]

    @property
    def groups(self) -> tuple[tuple[str, ...], ...]:
        """Linears of one block in execution order, grouped by shared input (true-sequential)."""
        return self.attention_in, (self.attention_out,), self.mlp_in, (self.mlp_out,)

    @property
    def linears(self) -> tuple[str, ...]:
        return tuple(name for group in self.groups for name in group)

    @property
    def attention(self) -> tuple[str, ...]:
        return (*self.attention_in, self.attention_out)

    @property
    def mlp(self) -> tuple[str, ...]:
        return (*self.mlp_in, self.mlp_out)

    @property
    def embeddings(self) -> tuple[str, ...]:
        """Modules run before block 0."""
        return (self.embed,) if self.positions is None else (self.embed, self.positions)


LLAMA = Family(
    runtime="llama",
    blocks="model.layers",
    attention_in=("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    attention_out="self_attn.o_proj",
    mlp_in=("mlp.gate_proj", "mlp.up_proj"),
    mlp_out="mlp.down_proj",
    norms=("input_layernorm", "post_attention_layernorm"),
    embed="model.embed_tokens",
    final_norm="model.norm",
)

QWEN3 = replace(LLAMA, qk_norms=("self_attn.q_norm", "self_attn.k_norm"))

OPT = Family(
    runtime="norm_mlp",
    blocks="model.decoder.layers",
    attention_in=("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    attention_out="self_attn.out_proj",
    mlp_in=("fc1",),
    mlp_out="fc2",
    norms=("self_attn_layer_norm", "final_layer_norm"),
    embed="model.decoder.embed_tokens",
    final_norm="model.decoder.final_layer_norm",
    positions="model.decoder.embed_positions",
    position_offset=2,
    project_in="model.decoder.project_in",
    project_out="model.decoder.project_out",
)

GPT2 = Family(
    runtime="norm_mlp",
    blocks="transformer.h",
    attention_in=("attn.c_attn",),
    attention_out="attn.c_proj",
    mlp_in=("mlp.c_fc",),
    mlp_out="mlp.c_proj",
    norms=("ln_1", "ln_2"),
    embed="transformer.wte",
    final_norm="transformer.ln_f",
    positions="transformer.wpe",
    conv1d=True,
)

FAMILIES: dict[str, Family] = {
    "llama": LLAMA,
    "mistral": LLAMA,
    "qwen2": LLAMA,
    "qwen3": QWEN3,
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


def vocab_tables(model: nn.Module, family: Family) -> tuple[str, ...]:
    """Paths of the float vocabulary tables a quantizer turns into packed ones: the head, and
    the embedding unless it shares the head's weight (a tied table is one table, stored once
    under the head)."""
    head, embed = model.get_submodule(family.head), model.get_submodule(family.embed)
    return (family.head,) if head.weight is embed.weight else (family.head, family.embed)
