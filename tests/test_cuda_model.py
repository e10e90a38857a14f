"""A whole tiny model on CUDA (the CuPy kernels) equals the torch twin, in float16 and bfloat16,
also with mixed slots (int32 and int64 ids).

Runs with `pytest -m cuda` on a machine with an NVIDIA GPU and CuPy; skipped elsewhere.
"""

import contextlib

import pytest
import torch
from tiny_models import rtn_swap, tiny_model

from owq.kernels import OWQLinear

pytestmark = pytest.mark.cuda


def _gpu_ready() -> bool:
    from owq.kernels import cuda_ops

    return torch.cuda.is_available() and cuda_ops.available()


requires_gpu = pytest.mark.skipif(not _gpu_ready(), reason="needs an NVIDIA GPU and CuPy")


def owq_layers(model):
    return [m for m in model.modules() if isinstance(m, OWQLinear)]


@contextlib.contextmanager
def per_row_slots(model, slots):
    """Make every OWQLinear of `model` use `slots` (one per batch row) for its weak columns."""
    saved = []
    for layer in owq_layers(model):
        saved.append((layer, layer.forward))
        layer.forward = lambda x, _f=layer.forward: _f(x, slots)
    try:
        yield
    finally:
        for layer, forward in saved:
            layer.forward = forward


def set_reference(model, on: bool):
    for layer in owq_layers(model):
        layer.force_reference = on


def quantized(kind, bits, group, slots=0, dtype=torch.float16):
    model = rtn_swap(tiny_model(kind), bits, group, weak=8)
    gen = torch.Generator().manual_seed(5)
    for layer in owq_layers(model):
        layer.resize_slots(slots)
        for s in range(1, slots + 1):
            layer.set_slot(s, torch.randn(8, layer.out_features, generator=gen).half() * 0.1)
    return model.to(dtype).cuda().eval()


@requires_gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("kind", ["llama", "opt", "gpt2"])
@pytest.mark.parametrize("bits,group", [(3, -1), (4, 32), (2, 64)])
@pytest.mark.parametrize("seq", [1, 7])
def test_model_logits_kernels_equal_twin(kind, bits, group, seq, dtype):
    model = quantized(kind, bits, group, dtype=dtype)
    ids = torch.randint(0, 96, (3, seq), generator=torch.Generator().manual_seed(0)).cuda()
    with torch.inference_mode():
        kernels = model(ids).logits.float()
        set_reference(model, True)
        twin = model(ids).logits.float()
    tol = 2e-2 if dtype == torch.float16 else 8e-2  # the bf16 twin rounds every product to bf16
    torch.testing.assert_close(kernels, twin, rtol=tol, atol=tol)


@requires_gpu
@pytest.mark.parametrize("slot_dtype", [torch.int32, torch.int64], ids=str)
@pytest.mark.parametrize("kind", ["llama", "opt"])
@pytest.mark.parametrize("batch", [3, 9, 16])
def test_mixed_slot_batch_equals_twin_and_rows_alone(kind, batch, slot_dtype):
    model = quantized(kind, 3, -1, slots=4)
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 96, (batch, 5), generator=gen).cuda()
    slots = torch.randint(0, 5, (batch,), generator=gen).to(slot_dtype).cuda()
    with torch.inference_mode(), per_row_slots(model, slots):
        kernels = model(ids).logits.float()
        set_reference(model, True)
        twin = model(ids).logits.float()
    torch.testing.assert_close(kernels, twin, rtol=2e-2, atol=2e-2)
    set_reference(model, False)
    with torch.inference_mode():
        for row in range(batch):
            with per_row_slots(model, slots[row : row + 1]):
                alone = model(ids[row : row + 1]).logits.float()
            torch.testing.assert_close(kernels[row : row + 1], alone, rtol=2e-2, atol=2e-2)
