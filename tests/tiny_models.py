"""Tiny random Llama / OPT / GPT-2 models and an RTN swap, for fast tests."""

from __future__ import annotations

import torch
from transformers import (
    AutoModelForCausalLM,
    GPT2Config,
    LlamaConfig,
    MistralConfig,
    OPTConfig,
    Qwen2Config,
    Qwen3Config,
)

from owq.kernels import OWQLinear
from owq.kernels.families import family_of, linear_weight, quantized_linear_paths, set_module

VOCAB = 96


LLAMA_LIKE = {"llama": LlamaConfig, "mistral": MistralConfig, "qwen2": Qwen2Config}


def tiny_config(kind: str):
    if kind in LLAMA_LIKE:
        return LLAMA_LIKE[kind](
            vocab_size=VOCAB,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=256,
            tie_word_embeddings=kind != "mistral",  # both head layouts
        )
    if kind == "qwen3":
        return Qwen3Config(  # head_dim wider than hidden / heads, per-head q/k norms
            vocab_size=VOCAB,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=32,
            max_position_embeddings=256,
            tie_word_embeddings=True,
        )
    if kind == "opt":
        return OPTConfig(
            vocab_size=VOCAB,
            hidden_size=64,
            ffn_dim=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=256,
            word_embed_proj_dim=64,
        )
    if kind == "gpt2":
        return GPT2Config(
            vocab_size=VOCAB,
            n_embd=64,
            n_layer=2,
            n_head=4,
            n_positions=256,
            bos_token_id=0,
            eos_token_id=0,
        )
    raise ValueError(kind)


def tiny_model(kind: str, seed: int = 0):
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(kind))
    return model.eval()


def rtn_swap(model, bits: int = 4, group_size: int = -1, weak=0, seed: int = 0):
    """Replace every quantizable linear with an RTN OWQLinear with `weak` random weak columns
    (an int, or a function of the layer's index in model order, for uneven k)."""
    gen = torch.Generator().manual_seed(seed)
    family = family_of(model.config)
    for i, path in enumerate(quantized_linear_paths(model, family)):
        module = model.get_submodule(path)
        weight = linear_weight(module)
        idx = torch.randperm(weight.shape[1], generator=gen)[: weak(i) if callable(weak) else weak]
        bias = module.bias.data if module.bias is not None else None
        set_module(model, path, OWQLinear.from_float(weight, bits, group_size, idx, bias))
    return model
