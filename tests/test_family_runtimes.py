"""Every registered architecture has a runtime, and its logits match transformers.

For each `model_type` of the Family table: a tiny random model of that type, every linear an RTN
OWQLinear with weak columns, then the own runtime built from the model's tensors against the
transformers forward on the same layers, for a prefill and for decode steps. Adding a family
without a runtime, or with one that computes something else, fails here.
"""

import pytest
import torch
from engine_fixtures import runtime_of
from tiny_models import VOCAB, rtn_swap, tiny_model

from owq.kernels.families import FAMILIES, family_of
from owq.server.runtime import RUNTIMES, KVCache, step_index

ATOL = 2e-4


def test_every_family_names_a_runtime():
    assert {f.runtime for f in FAMILIES.values()} <= set(RUNTIMES)


@pytest.mark.parametrize("model_type", sorted(FAMILIES))
def test_runtime_logits_match_transformers(model_type):
    model = rtn_swap(tiny_model(model_type), bits=4, group_size=32, weak=4)
    assert family_of(model.config) is FAMILIES[model_type]
    with torch.no_grad():  # biases and norm weights away from their init (zeros / ones)
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith(".bias"):
                p.add_(torch.randn_like(p) * 0.1)
    tokens = torch.randint(0, VOCAB, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        ref = model(tokens).logits
    rt = runtime_of(model, 64)
    cache = KVCache(rt.cache_shape(2))
    positions = torch.arange(6).expand(2, 6).contiguous()
    with torch.inference_mode():
        prefill = rt(tokens[:, :6], step_index(cache.shape, 0, positions), cache, None, "all")
        torch.testing.assert_close(prefill, ref[:, :6], atol=ATOL, rtol=0)
        for t in range(6, 9):
            step = step_index(cache.shape, 0, torch.full((2, 1), t), decode=True)
            out = rt(tokens[:, t : t + 1], step, cache, None, "last")
            torch.testing.assert_close(out, ref[:, t], atol=ATOL, rtol=0)
