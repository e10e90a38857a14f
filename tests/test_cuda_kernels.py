"""CUDA kernels (`cuda_ops`) against their torch twins; run with `pytest -m cuda` on a GPU.

Layers are built from random codes / scales / zeros through `OWQLinear.from_codes`, so the fp32
twin is exact by construction; the kernels may differ by fp16 output rounding only
(tolerances keyed by dtype, atol scaled by sqrt(K)).
"""

from __future__ import annotations

import functools
import math

import pytest
import torch

from owq.kernels import cuda_ops, cuda_twins, reference
from owq.kernels.owq_linear import OWQLinear

SHAPES = [(576, 576), (576, 1536), (1536, 576), (4096, 4096), (4096, 11008), (11008, 4096)]
RTOL = {torch.float16: 2e-3, torch.bfloat16: 1.6e-2, torch.float32: 1e-5}
ATOL_PER_SQRT_K = {torch.float16: 1e-4, torch.bfloat16: 1e-3, torch.float32: 1e-6}
NUM_SLOTS = 16


def _gpu_or_skip() -> None:
    if not torch.cuda.is_available():
        pytest.skip("needs an NVIDIA GPU: torch.cuda.is_available() is False")
    if not cuda_ops.available():
        pytest.skip("needs CuPy: pip install owq[cuda]")


def assert_close(actual: torch.Tensor, expected: torch.Tensor, k_dim: int, dtype=torch.float16):
    atol = ATOL_PER_SQRT_K[dtype] * math.sqrt(k_dim) * max(1.0, float(expected.abs().mean()))
    torch.testing.assert_close(actual.float(), expected.float(), rtol=RTOL[dtype], atol=atol)


@functools.lru_cache(maxsize=6)
def make_layer(in_f: int, out: int, bits: int, group: int, k: int, bias: bool = False) -> OWQLinear:
    """Random packed layer on the GPU with NUM_SLOTS adapter slots (seeded by its arguments)."""
    gen = torch.Generator().manual_seed(hash((in_f, out, bits, group, k, bias)) % 2**31)
    groups = 1 if group == -1 else in_f // group
    codes = torch.randint(0, 2**bits, (out, in_f), generator=gen)
    scales = torch.rand(groups, out, generator=gen) * 0.02 + 0.002
    zeros = torch.randint(0, 2**bits, (groups, out), generator=gen)
    idx = torch.randperm(in_f, generator=gen)[:k]
    oweight = torch.randn(out, k, generator=gen) * 0.05
    b = torch.randn(out, generator=gen) * 0.1 if bias else None
    layer = OWQLinear.from_codes(codes, scales, zeros, bits, group, idx, oweight, b)
    layer.resize_slots(NUM_SLOTS)
    for slot in range(1, NUM_SLOTS + 1):
        layer.set_slot(slot, torch.randn(k, out, generator=gen) * 0.05)
    return layer.cuda().requires_grad_(False)


def _args(layer: OWQLinear, slots=None):
    table = layer.adapter_table if slots is not None else None
    return (
        layer.qweight, layer.scales, layer.qzeros, layer.outlier_idx, layer.oweight,
        layer.bits, layer.group_size, layer.bias, table, slots,
    )  # fmt: skip


def _exact(x: torch.Tensor, layer: OWQLinear, slots=None) -> torch.Tensor:
    """fp32 twin of the layer op (dequantized weights are exact in fp32)."""
    q, s, z, idx, o, bits, group, bias, table, sl = _args(layer, slots)
    f32 = lambda t: None if t is None else t.float()  # noqa: E731
    return reference.owq_matmul(
        x.float(), q, s, z, idx, o.float(), bits, group, f32(bias), f32(table), sl
    )


def _x(m: int, in_f: int, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator(device="cuda").manual_seed(seed)
    return torch.randn(m, in_f, generator=gen, device="cuda").half()


def _slots(mix: str, m: int) -> torch.Tensor | None:
    if mix == "none":
        return None
    if mix == "one":
        return torch.full((m,), 3, dtype=torch.int64, device="cuda")
    if mix == "distinct":
        return torch.arange(m, device="cuda") % (NUM_SLOTS + 1)
    gen = torch.Generator().manual_seed(m)
    return torch.randint(0, NUM_SLOTS + 1, (m,), generator=gen).cuda()


# decode (M <= 8) ---------------------------------------------------------------------------
@pytest.mark.cuda
@pytest.mark.parametrize("k", [0, 8, 64])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("m", [1, 2, 3, 4, 8])
@pytest.mark.parametrize("group", [-1, 128])
@pytest.mark.parametrize("bits", [2, 3, 4])
def test_decode_gemv_matches_twin(bits, group, m, shape, k):
    _gpu_or_skip()
    layer = make_layer(*shape, bits, group, k, bias=k == 8)
    x = _x(m, shape[0])
    y = cuda_ops.dequant_gemv(x, *_args(layer))
    assert y.shape == (m, shape[1]) and y.dtype == torch.float16
    assert_close(y, _exact(x, layer), shape[0])


# batched (M > 8) ---------------------------------------------------------------------------
@pytest.mark.cuda
@pytest.mark.parametrize("k", [0, 64])
@pytest.mark.parametrize("shape", [(576, 1536), (4096, 4096)], ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("m", [9, 16, 33, 128])
@pytest.mark.parametrize("group", [-1, 128])
@pytest.mark.parametrize("bits", [2, 3, 4])
def test_batched_matches_twin(bits, group, m, shape, k):
    _gpu_or_skip()
    layer = make_layer(*shape, bits, group, k, bias=True)
    x = _x(m, shape[0], seed=m)
    y = cuda_ops.owq_matmul(x, *_args(layer))
    assert_close(y, _exact(x, layer), shape[0])


@pytest.mark.cuda
@pytest.mark.parametrize("shape", [(576, 1536), (96, 100), (4096, 4096)], ids=str)
@pytest.mark.parametrize("group", [-1, 32])
@pytest.mark.parametrize("bits", [2, 3, 4])
def test_dequantize_fp16_is_bit_exact(bits, group, shape):
    _gpu_or_skip()
    layer = make_layer(*shape, bits, group, 0)
    w = cuda_ops.dequantize_fp16(layer.qweight, layer.scales, layer.qzeros, bits, group)
    expected = cuda_twins.dequantize_fp16(layer.qweight, layer.scales, layer.qzeros, bits, group)
    assert torch.equal(w, expected)


# per-row adapter slots ---------------------------------------------------------------------
@pytest.mark.cuda
@pytest.mark.parametrize("mix", ["none", "one", "distinct", "random"])
@pytest.mark.parametrize("k", [0, 8, 64])
@pytest.mark.parametrize("m", [1, 4, 8, 16, 64])
def test_slot_mixes_match_twin(m, k, mix):
    _gpu_or_skip()
    layer = make_layer(1536, 576, 3, 128, k, bias=True)
    x, slots = _x(m, 1536, seed=k), _slots(mix, m)
    y = cuda_ops.owq_matmul(x, *_args(layer, slots))
    assert_close(y, _exact(x, layer, slots), 1536)


@pytest.mark.cuda
@pytest.mark.parametrize("out", [576, 100])
@pytest.mark.parametrize("mix", ["none", "distinct", "random"])
@pytest.mark.parametrize("m", [1, 9, 40])
def test_weak_columns_sgmv_matches_twin(m, mix, out):
    _gpu_or_skip()
    layer = make_layer(576 if out == 576 else 96, out, 4, -1, 8, bias=True)
    x, slots = _x(m, layer.in_features, seed=m), _slots(mix, m)
    base = torch.randn(m, out, device="cuda").half()
    args = (layer.outlier_idx, layer.oweight, layer.adapter_table, slots, layer.bias)
    y = cuda_ops.weak_columns_sgmv(x, *args, out=base.clone())
    assert_close(y, cuda_twins.weak_columns_sgmv(x.float(), *args, out=base.float()), 8)
    fresh = cuda_ops.weak_columns_sgmv(x, *args)
    assert_close(fresh, cuda_twins.weak_columns_sgmv(x.float(), *args), 8)


@pytest.mark.cuda
@pytest.mark.parametrize("m", [1, 5, 8, 12, 40])
@pytest.mark.parametrize("bits", [2, 3, 4])
def test_odd_width_takes_scalar_path(bits, m):
    _gpu_or_skip()
    layer = make_layer(96, 100, bits, 32, 8, bias=True)
    x, slots = _x(m, 96), _slots("random", m)
    assert_close(cuda_ops.owq_matmul(x, *_args(layer, slots)), _exact(x, layer, slots), 96)


# the layer ---------------------------------------------------------------------------------
@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("batch,seq", [(1, 1), (4, 1), (3, 7), (2, 40)])
def test_owq_linear_cuda_matches_force_reference(batch, seq, dtype):
    _gpu_or_skip()
    layer = make_layer(576, 1536, 3, 128, 8, bias=True)
    x = torch.randn(batch, seq, 576, device="cuda", dtype=dtype)
    slots = torch.arange(batch, device="cuda") % (NUM_SLOTS + 1)
    with torch.no_grad():
        y = layer(x, slots)
        layer.force_reference = True
        try:
            expected = layer(x.float(), slots)
        finally:
            layer.force_reference = False
    assert y.shape == (batch, seq, 1536) and y.dtype == dtype
    assert_close(y, expected, 576, dtype if dtype != torch.float32 else torch.float16)


@pytest.mark.cuda
def test_training_falls_back_to_twin_with_grad():
    _gpu_or_skip()
    layer = make_layer(576, 576, 4, -1, 8)
    layer.oweight.requires_grad_(True)
    try:
        layer(torch.randn(2, 3, 576, device="cuda").half()).float().square().sum().backward()
        assert layer.oweight.grad is not None and layer.oweight.grad.abs().sum() > 0
    finally:
        layer.oweight.requires_grad_(False)
        layer.oweight.grad = None


@pytest.mark.cuda
def test_cuda_graph_replay_matches_eager():
    _gpu_or_skip()
    layer = make_layer(4096, 4096, 3, 128, 8, bias=True)
    x = _x(4, 4096)
    eager = cuda_ops.owq_matmul(x, *_args(layer))
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = cuda_ops.owq_matmul(x, *_args(layer))
    for _ in range(3):
        graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(captured, eager)


# no GPU needed -----------------------------------------------------------------------------
def test_bad_inputs_raise_value_error_with_sizes():
    layer = OWQLinear(64, 40, 3, -1, num_weak=2)
    x = torch.zeros(2, 64, dtype=torch.float16)
    with pytest.raises(ValueError, match="CUDA"):
        cuda_ops.owq_matmul(x, *_args(layer))
    with pytest.raises(ValueError, match=r"\[6, 40\]"):
        cuda_ops._check_packed(layer.qweight[:-1], layer.scales, layer.qzeros, 64, 3, -1, x.device)
    with pytest.raises(ValueError, match=r"\[2, 40\]"):
        cuda_ops._check_weak(x, layer.outlier_idx, layer.oweight[:, :-1], None, None, None, 40)


def test_unavailable_without_gpu():
    if not torch.cuda.is_available():
        assert not cuda_ops.available()
