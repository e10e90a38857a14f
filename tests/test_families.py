"""The family table finds blocks, linears in execution order, embeddings, norm and head."""

import pytest
import torch
from tiny_models import tiny_model
from transformers import BertConfig, MistralConfig, Qwen2Config

from owq.kernels.families import (
    LLAMA,
    family_of,
    linear_shape,
    linear_weight,
    quantized_linear_paths,
)

KINDS = ["llama", "opt", "gpt2"]


@pytest.mark.parametrize("kind", KINDS)
def test_linears_listed_in_execution_order(kind):
    model = tiny_model(kind)
    family = family_of(model.config)
    block = model.get_submodule(family.blocks)[0]
    seen = []
    hooks = [
        block.get_submodule(name).register_forward_hook(lambda *_, n=name: seen.append(n))
        for name in family.linears
    ]
    with torch.no_grad():
        model(torch.randint(0, 96, (1, 5)))
    for h in hooks:
        h.remove()
    assert seen == list(family.linears)


@pytest.mark.parametrize("kind", KINDS)
def test_paths_exist_and_shapes(kind):
    model = tiny_model(kind)
    family = family_of(model.config)
    for path in (*family.embeddings, family.final_norm, family.head):
        model.get_submodule(path)
    paths = quantized_linear_paths(model, family)
    assert len(paths) == 2 * len(family.linears)
    for path in paths:
        module = model.get_submodule(path)
        in_f, out_f = linear_shape(module)
        assert tuple(linear_weight(module).shape) == (out_f, in_f)


def test_gpt2_conv1d_weight_is_transposed():
    model = tiny_model("gpt2")
    c_attn = model.get_submodule("transformer.h.0.attn.c_attn")
    assert linear_shape(c_attn) == (64, 192)
    assert torch.equal(linear_weight(c_attn), c_attn.weight.data.t())


def test_llama_family_members_by_model_type():
    assert family_of(MistralConfig()) is LLAMA
    assert family_of(Qwen2Config()) is LLAMA


def test_unknown_architecture_names_supported_ones():
    with pytest.raises(
        ValueError, match="model_type='bert'.*gpt2, llama, mistral, opt, qwen2, qwen3"
    ):
        family_of(BertConfig())
