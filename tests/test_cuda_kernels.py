"""CUDA kernels (`cuda_ops`) against their torch twins; run with `pytest -m cuda` on a GPU.

Layers come from `test_cuda_cases.make_layer` (exact fp32 twin by construction). Covers the
shapes of real models, groups -1/32/64/128, M 1-8 and the batched path, k 0/8/64/130, slot mixes
with int32 and int64 ids, misaligned views, bf16 activations, grid limits (M > 524,280),
determinism on one device, and CUDA-graph capture.
"""

from __future__ import annotations

import copy
import functools

import pytest
import torch
from test_cuda_cases import (
    NUM_SLOTS,
    SLOT_MIXES,
    assert_close,
    exact,
    make_layer,
    make_slots,
    make_x,
)

from owq.kernels import cuda_ops, cuda_twins
from owq.kernels.types import PackedWeight, WeakColumns

pytestmark = pytest.mark.cuda
SHAPES = [(576, 576), (576, 1536), (1536, 576), (4096, 4096), (4096, 11008), (11008, 4096)]


@pytest.fixture(autouse=True)
def _gpu_or_skip():
    if not torch.cuda.is_available():
        pytest.skip("needs an NVIDIA GPU: torch.cuda.is_available() is False")
    if not cuda_ops.available():
        pytest.skip("needs CuPy: pip install owq[cuda]")


@functools.lru_cache(maxsize=8)
def gpu_layer(in_f: int, out: int, bits: int, group: int, k: int, bias: bool = False):
    return copy.deepcopy(make_layer(in_f, out, bits, group, k, bias)).cuda()


def _group(shape, group: int) -> int:
    """`group` where it divides in_features, else the largest of 64 and 32 that does."""
    return next(g for g in (group, 64, 32) if g == -1 or shape[0] % g == 0)


def _x(m: int, in_f: int, seed: int = 0, dtype=torch.float16) -> torch.Tensor:
    return make_x(m, in_f, seed, dtype, "cuda")


def _slots(mix: str, m: int, seed: int = 0):
    return make_slots(mix, m, NUM_SLOTS, seed, "cuda")


def _check(op, layer, m, mix="none", dtype=torch.float16, seed=0, bias=True):
    x, slots = _x(m, layer.in_features, seed, dtype), _slots(mix, m, seed)
    y = getattr(cuda_ops, op)(x, layer.packed, layer.weak, layer.bias if bias else None, slots)
    assert y.shape == (m, layer.out_features) and y.dtype == dtype
    assert_close(y, exact(x, layer, slots, bias), layer.in_features, dtype)
    return y


# decode (M <= 8) and the batched path, every M of a layer in one test ----------------------
K_BY_BITS = {2: 0, 3: 8, 4: 64}


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("group", [-1, 32, 64, 128])
@pytest.mark.parametrize("bits", [2, 3, 4])
def test_decode_gemv_matches_twin(bits, group, shape):
    k = K_BY_BITS[bits]
    layer = gpu_layer(*shape, bits, _group(shape, group), k, bias=k == 8)
    for m in range(1, 9):
        _check("dequant_gemv", layer, m, bias=k == 8)


@pytest.mark.parametrize("k", [0, 64, 130])
@pytest.mark.parametrize("shape", [(576, 1536), (4096, 4096)], ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("group", [-1, 32, 64, 128])
@pytest.mark.parametrize("bits", [2, 3, 4])
def test_batched_matches_twin(bits, group, shape, k):
    layer = gpu_layer(*shape, bits, _group(shape, group), k, bias=True)
    for m in (9, 16, 33, 128):
        _check("owq_matmul", layer, m, seed=m)


@pytest.mark.parametrize("shape", [(576, 1536), (96, 100), (4096, 4096)], ids=str)
@pytest.mark.parametrize("group", [-1, 32, 64, 128])
@pytest.mark.parametrize("bits", [2, 3, 4])
def test_dequantize_fp16_is_bit_exact(bits, group, shape):
    layer = gpu_layer(*shape, bits, _group(shape, group), 0)
    assert torch.equal(
        cuda_ops.dequantize_fp16(layer.packed), cuda_twins.dequantize_fp16(layer.packed)
    )


# per-row adapter slots ---------------------------------------------------------------------
@pytest.mark.parametrize("mix", SLOT_MIXES)
@pytest.mark.parametrize("k", [0, 8, 64, 130])
@pytest.mark.parametrize("m", [1, 4, 5, 8, 16, 64])
def test_slot_mixes_match_twin(m, k, mix):
    _check("owq_matmul", gpu_layer(1536, 576, 3, 128, k, bias=True), m, mix, seed=k)


@pytest.mark.parametrize("k", [0, 8, 130])
@pytest.mark.parametrize("out", [576, 100])
@pytest.mark.parametrize("mix", ["none", "distinct", "random", "int32"])
@pytest.mark.parametrize("m", [1, 9, 40])
def test_weak_columns_sgmv_matches_twin(m, mix, out, k):
    layer = gpu_layer(576 if out == 576 else 160, out, 4, -1, k, bias=True)
    x, slots = _x(m, layer.in_features, seed=m), _slots(mix, m)
    base = torch.randn(m, out, device="cuda").half()
    fp32 = WeakColumns(layer.outlier_idx, layer.weak_table.float())
    y = cuda_ops.weak_columns_sgmv(x, layer.weak, slots, layer.bias, out=base.clone())
    expected = cuda_twins.weak_columns_sgmv(
        x.float(), fp32, slots, layer.bias.float(), base.float()
    )
    assert_close(y, expected, max(k, 1))
    fresh = cuda_ops.weak_columns_sgmv(x, layer.weak, slots, layer.bias)
    assert_close(fresh, cuda_twins.weak_columns_sgmv(x.float(), fp32, slots, layer.bias.float()), 8)


@pytest.mark.parametrize("m", [1, 5, 8, 12, 40])
@pytest.mark.parametrize("bits", [2, 3, 4])
def test_odd_width_takes_scalar_path(bits, m):
    _check("owq_matmul", gpu_layer(96, 100, bits, 32, 8, bias=True), m, "random")


@pytest.mark.parametrize("m", [1, 8, 40])
@pytest.mark.parametrize("which", ["qweight", "scales", "bias", "table"])
def test_misaligned_views_match_twin(which, m):
    layer = gpu_layer(1536, 576, 3, 128, 8, bias=True)
    parts = {"qweight": layer.qweight, "scales": layer.scales, "bias": layer.bias}
    parts["table"] = layer.weak_table
    flat = torch.empty(parts[which].numel() + 1, dtype=parts[which].dtype, device="cuda")
    parts[which] = flat[1:].view(parts[which].shape).copy_(parts[which])
    packed = PackedWeight(parts["qweight"], parts["scales"], layer.qzeros, 3, 128)
    x, slots = _x(m, 1536, seed=m), _slots("random", m)
    y = cuda_ops.owq_matmul(
        x, packed, WeakColumns(layer.outlier_idx, parts["table"]), parts["bias"], slots
    )
    assert_close(y, exact(x, layer, slots), 1536)


@pytest.mark.parametrize("m", [1, 4, 8, 40])
@pytest.mark.parametrize("bits", [2, 3, 4])
def test_bfloat16_activations_past_float16_range(bits, m):
    layer = gpu_layer(4096, 4096, bits, 128, 8, bias=True)
    x, slots = _x(m, 4096, seed=m, dtype=torch.bfloat16), _slots("random", m)
    x[:, int(layer.outlier_idx[0])] = 1.0e5
    y = cuda_ops.owq_matmul(x, layer.packed, layer.weak, layer.bias, slots)
    assert y.dtype == torch.bfloat16 and bool(torch.isfinite(y).all())
    assert_close(y, exact(x, layer, slots), 4096, torch.bfloat16)


def test_grid_limits_past_524280_rows():
    layer = gpu_layer(64, 8, 4, -1, 2, bias=True)
    for op, m in (("owq_matmul", 524_281), ("dequant_gemv", 524_289)):
        _check(op, layer, m, "random", seed=1)


def test_bitwise_deterministic_on_one_device():
    layer = gpu_layer(4096, 11008, 3, 128, 8, bias=True)
    x, slots = _x(3, 4096), _slots("random", 3)
    first = cuda_ops.dequant_gemv(x, layer.packed, layer.weak, layer.bias, slots)
    for _ in range(5):
        again = cuda_ops.dequant_gemv(x, layer.packed, layer.weak, layer.bias, slots)
        assert torch.equal(again, first)


# the layer ---------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("batch,seq", [(1, 1), (4, 1), (3, 7), (2, 40)])
def test_owq_linear_cuda_matches_force_reference(batch, seq, dtype):
    layer = gpu_layer(576, 1536, 3, 64, 8, bias=True)
    x = torch.randn(batch, seq, 576, device="cuda", dtype=dtype)
    slots = (torch.arange(batch, device="cuda") % (NUM_SLOTS + 1)).to(torch.int32)
    with torch.no_grad():
        y = layer(x, slots)
        layer.force_reference = True
        try:
            expected = layer(x.float(), slots)
        finally:
            layer.force_reference = False
    assert y.shape == (batch, seq, 1536) and y.dtype == dtype
    assert_close(y, expected, 576, dtype)


def test_training_falls_back_to_twin_with_grad():
    layer = copy.deepcopy(gpu_layer(576, 576, 4, -1, 8))
    layer.train_weak_columns(True)
    layer(torch.randn(2, 3, 576, device="cuda").half()).float().square().sum().backward()
    assert layer.trainable.grad is not None and layer.trainable.grad.abs().sum() > 0


def test_cuda_graph_replay_matches_eager():
    layer = gpu_layer(4096, 4096, 3, 128, 8, bias=True)
    x = _x(4, 4096)
    args = (layer.packed, layer.weak, layer.bias)
    eager = cuda_ops.owq_matmul(x, *args)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = cuda_ops.owq_matmul(x, *args)
    for _ in range(3):
        graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(captured, eager)
