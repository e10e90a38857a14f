"""OWQLinear against a float reference built from the same codes; slots; autograd."""

import pytest
import torch

from owq.kernels import OWQLinear, cpu_ops
from owq.kernels.cpu_ops import int4_codes, layer_codes, weak_bag, weak_product
from owq.kernels.packing import unpack_zeros
from owq.kernels.reference import owq_matmul, weak_columns_product
from owq.kernels.types import WeakColumns

IN, OUT = 128, 48


def build(bits=3, group_size=32, k=8, seed=0, bias=True, out=OUT):
    """A layer from random codes plus the exact float weight those codes stand for."""
    gen = torch.Generator().manual_seed(seed)
    groups = 1 if group_size == -1 else IN // group_size
    codes = torch.randint(0, 2**bits, (out, IN), generator=gen)
    zeros = torch.randint(0, 2**bits, (groups, out), generator=gen)
    scales = (torch.rand(groups, out, generator=gen) * 0.1 + 0.01).half()
    idx = torch.randperm(IN, generator=gen)[:k]
    weak = torch.randn(out, k, generator=gen).half()
    b = torch.randn(out, generator=gen).half() if bias else None
    layer = OWQLinear.from_codes(codes, scales, zeros, bits, group_size, idx, weak, b)
    g = torch.arange(IN) // (IN if group_size == -1 else group_size)
    dense = (codes - zeros[g].t()).float() * scales.float()[g].t()  # [out, IN]
    dense[:, idx] = weak.float()
    return layer, dense, (b.float() if bias else torch.zeros(out))


@pytest.mark.parametrize("batch", [1, 2, 3, 8, 17])
@pytest.mark.parametrize("k", [0, 1, 8])
@pytest.mark.parametrize("bits,group_size", [(2, -1), (3, 32), (4, 128)])
def test_matches_float_reference(batch, k, bits, group_size):
    layer, dense, bias = build(bits, group_size, k, seed=batch + k)
    x = torch.randn(batch, IN)
    expected = x @ dense.t() + bias
    torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-4)
    twin = owq_matmul(x, layer.packed, layer.weak, layer.bias)
    torch.testing.assert_close(twin, expected, rtol=1e-5, atol=1e-4)


def test_three_dim_input():
    layer, dense, bias = build()
    x = torch.randn(2, 5, IN)
    torch.testing.assert_close(layer(x), x @ dense.t() + bias, rtol=1e-5, atol=1e-4)


def test_weak_rows_of_dense_part_are_exactly_zero():
    layer, _, _ = build(k=8)
    dense = layer.dense_weight(torch.float32)  # [OUT, IN]
    assert bool((dense[:, layer.outlier_idx.long()] == 0).all())
    others = torch.ones(IN, dtype=torch.bool)
    others[layer.outlier_idx.long()] = False
    assert bool((dense[:, others] != 0).any())


@pytest.mark.parametrize("bits,group_size", [(2, -1), (3, -1), (4, -1), (3, 32)])
def test_layer_codes_times_scale_is_the_dense_part(bits, group_size):
    layer, _, _ = build(bits, group_size, k=8, bias=False)
    dense = layer.packed.dequantize(torch.float32).t()
    codes, zeros, scale = layer_codes(layer.packed)
    assert codes.dtype == torch.int32 and codes.shape == (OUT, IN)
    assert 0 <= int(codes.min()) and int(codes.max()) < 2**bits
    weak = codes[:, layer.outlier_idx.long()]
    assert bool((weak == zeros[:, layer.outlier_idx.long()]).all())
    torch.testing.assert_close((codes - zeros).float() * scale, dense, rtol=0, atol=0)


@pytest.mark.parametrize("bits,group_size", [(3, -1), (4, 32), (2, 64)])
def test_wide_layer_unpacks_by_chunks_exactly(bits, group_size, fast_kernel):
    """A layer wider than one unpacking chunk (as an LM head is, a chunk of output rows at a
    time): its dense weight and the 4-bit kernel's codes are what the one-piece formula gives,
    and each fast kernel's product is its exact emulation's."""
    out = 2 * 1024 + 80  # two whole chunks and a ragged third
    layer, _, _ = build(bits, group_size, k=8, bias=False, out=out)
    codes, zeros, scale = layer_codes(layer.packed)  # unpacked in one piece
    dense = layer.packed.dequantize(torch.float32).t()
    assert torch.equal(dense, (codes - zeros).float() * scale)
    centred = bits <= 3
    zero_g = unpack_zeros(layer.packed.qzeros, bits, out)
    assert torch.equal(
        int4_codes(layer.packed, zero_g, centred), codes - zeros + 8 if centred else codes
    )
    plan = layer.prepare(torch.float32, int4=True, resident=False)
    assert plan.kernel == fast_kernel
    x = torch.randn(3, IN, generator=torch.Generator().manual_seed(2))
    y = cpu_ops.dense(x, plan, layer.packed, fast=True)
    torch.testing.assert_close(y, cpu_ops.fast_twin(x, plan, layer.packed), rtol=2**-8, atol=1e-5)


def test_outlier_idx_sorted_unique_and_oweight_follows():
    layer, dense, _ = build(k=8)
    idx = layer.outlier_idx.long()
    assert torch.equal(idx, torch.sort(idx).values)
    assert torch.equal(layer.oweight.float(), dense[:, idx].t())


def test_mixed_slots_equal_each_row_alone():
    layer, _, _ = build(k=8, seed=3)
    layer.resize_slots(3)
    gen = torch.Generator().manual_seed(1)
    for s in range(1, 4):
        layer.set_slot(s, torch.randn(8, OUT, generator=gen).half())
    x = torch.randn(6, 4, IN, generator=gen)  # [B, T, in]
    slots = torch.tensor([0, 2, 1, 3, 2, 0])
    batched = layer(x, slots)
    for row in range(6):
        alone = layer(x[row : row + 1], slots[row : row + 1])
        torch.testing.assert_close(batched[row : row + 1], alone, rtol=1e-6, atol=1e-5)
    # slot 0 is the base's own columns; a different slot really changes the row
    torch.testing.assert_close(layer(x[:1], torch.tensor([0])), layer(x[:1]), rtol=0, atol=0)
    assert not torch.allclose(batched[1], layer(x[1:2])[0])


@pytest.mark.parametrize("slots", [[2, 2, 2, 2], [0, 0, 0, 0], [3, 1, 3, 1], [1, 0, 2, 3]], ids=str)
def test_weak_product_of_the_slots_a_batch_uses_equals_the_twin(slots):
    """Only the used slots' tables are read (one adapter for every row, or a subset)."""
    layer, _, _ = build(k=8, seed=4)
    layer.resize_slots(3)
    gen = torch.Generator().manual_seed(2)
    for s in range(1, 4):
        layer.set_slot(s, torch.randn(8, OUT, generator=gen).half())
    weak = WeakColumns(layer.outlier_idx, layer.weak_table.float())
    x, slots = torch.randn(4, 3, IN, generator=gen), torch.tensor(slots)
    want = weak_columns_product(x, weak, slots)
    torch.testing.assert_close(weak_product(x, weak, slots), want, rtol=1e-6, atol=1e-5)


@pytest.mark.parametrize("t", [1, 3])
@pytest.mark.parametrize("slots", [[2, 2, 2, 2], [3, 1, 0, 2], [1, 0, 1, 0]], ids=str)
def test_weak_bag_equals_the_twin_and_each_row_alone(slots, t):
    """The fast kernel of the weak part: on an fp32 table the twin's numbers; on the fp16 table
    (as stored) the twin on the same fp16 inputs within fp16 rounding of the sum; either way a
    row's result is bit for bit what it is alone or beside any other slots."""
    layer, _, _ = build(k=8, seed=4)
    layer.resize_slots(3)
    gen = torch.Generator().manual_seed(5)
    for s in range(1, 4):
        layer.set_slot(s, torch.randn(8, OUT, generator=gen).half())
    x, slots = torch.randn(4, t, IN, generator=gen) * 4, torch.tensor(slots)
    exact = WeakColumns(layer.outlier_idx, layer.weak_table.float())
    want = weak_columns_product(x, exact, slots)
    torch.testing.assert_close(weak_bag(x, exact, slots), want, rtol=1e-6, atol=1e-5)
    half = WeakColumns(layer.outlier_idx, layer.weak_table)  # fp16
    got = weak_bag(x, half, slots)
    assert got.dtype == torch.float16
    want = weak_columns_product(x.half().float(), exact, slots)
    torch.testing.assert_close(got.float(), want, rtol=2**-10, atol=1e-3)
    for row in range(4):
        alone = weak_bag(x[row : row + 1], half, slots[row : row + 1])
        assert torch.equal(got[row : row + 1], alone)


@pytest.mark.parametrize("slots", [[0, 0, 0], [2, 1, 2], [0, 2, 1], [1, 0, 0]], ids=str)
def test_packed_steps_give_a_row_the_numbers_it_gets_alone(slots, fast_kernel):
    """A packed (fast) step is the low-bit dense part plus, per row, the fp16 bag of its adapter's
    columns or the fp32 GEMM on the base's. A row's numbers are bit for bit those it gets
    alone, beside any slots; an exact step is the fp32 GEMM whatever the slots."""
    from owq.kernels.cpu_ops import add_base_columns, dense

    layer, _, _ = build(bits=3, group_size=-1, k=8, seed=6, bias=False)
    layer.resize_slots(2)
    gen = torch.Generator().manual_seed(7)
    for s in (1, 2):
        layer.set_slot(s, torch.randn(8, OUT, generator=gen).half())
    layer.prepare(torch.float32, int4=True, resident=False)
    assert layer.cpu.kernel == fast_kernel
    x = torch.randn(3, 1, IN, generator=gen) * 4
    slots = torch.tensor(slots)
    weak = WeakColumns(layer.outlier_idx, layer.weak_table)
    part = dense(x, layer.cpu, layer.packed, fast=True)
    got = layer(x, slots, fast=True)
    for row, slot in enumerate(slots.tolist()):
        one, xr = slots[row : row + 1], x[row : row + 1]
        if slot:
            want = part[row] + weak_bag(xr, weak, one)[0]
        else:
            want = part[row].clone()
            add_base_columns(want, xr[:, 0], weak, layer.weak_table[0].float(), row_invariant=True)
        assert torch.equal(got[row], want)
        assert torch.equal(got[row], layer(xr, one, fast=True)[0])
        assert torch.equal(got[row], layer(xr, None if slot == 0 else one, fast=True)[0])
    exact = layer(x, slots)  # fp32; the packed path rounds activations and its sums to bf16
    torch.testing.assert_close(got, exact, rtol=0, atol=2**-7 * float(exact.abs().max()))
    assert torch.equal(layer(x, None), layer(x, torch.zeros(3, dtype=torch.long)))


@pytest.mark.parametrize("slots", [[1, 2, 3, 0, 1], [2, 0, 2, 0, 2]], ids=str)
def test_fused_layer_with_many_slots_equals_its_parts(slots):
    """A fused layer's one table holds each part's slots: rows of several slots equal each part
    run alone, also after a slot is written between two steps."""
    from owq.kernels.fused import fuse

    layers = [build(k=8, seed=s, bias=False)[0] for s in (5, 6, 7)]
    for layer in layers:
        layer.resize_slots(3)
    fused = fuse(layers)
    gen = torch.Generator().manual_seed(3)
    for slot in range(1, 4):
        for i, layer in enumerate(layers):
            cols = torch.randn(8, OUT, generator=gen).half()
            layer.set_slot(slot, cols)
            fused.set_slot(slot, cols, part=i)
    x, slots = torch.randn(5, 2, IN, generator=gen), torch.tensor(slots)
    for _ in range(2):
        want = torch.cat([layer(x, slots) for layer in layers], -1)
        torch.testing.assert_close(fused(x, slots), want, rtol=1e-5, atol=1e-4)
        cols = torch.randn(8, OUT, generator=gen).half()
        layers[1].set_slot(2, cols)
        fused.set_slot(2, cols, part=1)


def test_slot_errors():
    layer, _, _ = build(k=8)
    layer.resize_slots(2)
    with pytest.raises(ValueError, match="slot 3 out of range"):
        layer.set_slot(3, torch.zeros(8, OUT))
    with pytest.raises(ValueError, match=r"expected \[8, 48\]"):
        layer.set_slot(1, torch.zeros(4, OUT))
    with pytest.raises(ValueError, match="expects 128"):
        layer(torch.zeros(2, 64))


def test_gradients_reach_every_used_slot_and_x_never_codes():
    layer, _, _ = build(k=8)
    layer.resize_slots(1)
    layer.weak_table.requires_grad_(True)
    x = torch.randn(3, IN, requires_grad=True)
    layer(x, torch.tensor([0, 1, 0])).square().sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    grad = layer.weak_table.grad
    assert grad is not None and grad[0].abs().sum() > 0 and grad[1].abs().sum() > 0
    for name in ("qweight", "scales", "qzeros", "outlier_idx"):
        tensor = getattr(layer, name)
        assert not tensor.requires_grad and tensor.grad is None, name


def test_wct_mode_trains_only_slot_0_and_writes_back_fp16():
    layer, dense, bias = build(k=8)
    x = torch.randn(3, IN)
    layer.train_weak_columns()
    assert [n for n, p in layer.named_parameters() if p.requires_grad] == ["trainable"]
    torch.testing.assert_close(layer(x), x @ dense.t() + bias, rtol=1e-5, atol=1e-4)
    layer(x).square().sum().backward()
    assert layer.trainable.grad is not None and layer.trainable.grad.abs().sum() > 0
    with torch.no_grad():
        layer.trainable.add_(0.123)
    moved = layer.trainable.detach().half()
    layer.train_weak_columns(False)
    assert list(layer.named_parameters()) == []
    assert torch.equal(layer.oweight, moved) and layer.oweight.dtype == torch.float16
    assert torch.equal(layer.state_dict()["oweight"], moved)


def test_from_float_keeps_weak_columns_exact_and_quantizes_the_rest():
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(OUT, IN, generator=gen)
    idx = torch.tensor([3, 77, 100])
    layer = OWQLinear.from_float(w, 4, 32, idx)
    dense = layer.dense_weight(torch.float32)
    assert torch.equal(layer.oweight.float().t(), w[:, idx].half().float())
    rest = torch.ones(IN, dtype=torch.bool)
    rest[idx] = False
    err = (dense[:, rest] - w[:, rest]).abs().max()
    step = (w.abs().max() * 2 / 15).item()
    assert err <= step / 2 + 1e-3


def test_cache_invalidated_by_load_state_dict():
    a, _, _ = build(seed=1)
    b, dense_b, bias_b = build(seed=2)
    x = torch.randn(2, IN)
    a(x)  # fills a's dense cache
    a.load_state_dict(b.state_dict())
    torch.testing.assert_close(a(x), x @ dense_b.t() + bias_b, rtol=1e-5, atol=1e-4)
