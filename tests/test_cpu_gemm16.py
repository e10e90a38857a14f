"""The 16-bit GEMM of the compiled CPU step (`kernels/cpu_gemm16.cpp`, on VNNI CPUs by default):
bit for bit its twin (`cpu_ops.int16_twin`) at every shape, group size and row count, each row
the same alone as in a batch, closer to the fp64 product than the bf16 kernel; the compiled step
on it equals the eager blocks on its twin. The kernel needs AVX-512 VNNI: those tests run where
the CPU has it (the layout test runs everywhere)."""

import pytest
import torch
from test_cpu_decode import (
    eager_and_fused,
    eager_blocks_on_the_twin_of_the_gemm,  # noqa: F401 (autouse)
    setup,
)

from owq.kernels import OWQLinear, cpu_decode, cpu_ops


def module_or_skip():
    module = cpu_decode.load()
    if module is None or not module.gemm16_supported():
        pytest.skip("the 16-bit GEMM needs AVX-512 VNNI (and the compiled module)")
    return module


def layer(k: int, n: int, group_size: int, bits: int, seed: int = 0) -> OWQLinear:
    gen = torch.Generator().manual_seed(seed)
    weight = torch.randn(n, k, generator=gen)
    return OWQLinear.from_float(weight, bits, group_size, torch.tensor([1, 5]))


def test_the_layout_puts_each_lanes_pairs_in_its_nibbles():
    n, k = 32, 8
    codes = torch.arange(n * k, dtype=torch.int32).view(n, k) % 16
    packed = cpu_decode.gemm16_pack(codes)
    assert packed.shape == (2, 2, 32) and packed.dtype == torch.uint8
    for block, step, lane, j in [(0, 0, 0, 0), (1, 1, 15, 1), (0, 1, 7, 0), (1, 0, 3, 1)]:
        row, col = 16 * block + lane, 4 * step + j
        byte = int(packed[block, step, 2 * lane + j])
        assert (byte & 15, byte >> 4) == (int(codes[row, col]), int(codes[row, col + 2]))


@pytest.mark.parametrize(
    "k,n,group_size,bits",
    [(64, 32, -1, 3), (64, 48, 32, 3), (576, 96, -1, 3), (96, 16, 32, 2), (1536, 64, 128, 3)],
)
def test_the_kernel_is_its_twin_bit_for_bit(k, n, group_size, bits):
    module = module_or_skip()
    q = layer(k, n, group_size, bits)
    ops = cpu_decode.gemm16_operands(q)
    gen = torch.Generator().manual_seed(1)
    for rows in (1, 3, 8, 9, 17):  # every tile height, and a third pass of 8
        x = torch.randn(rows, k, generator=gen)
        x[:, 3] *= 40  # an activation outlier sets each row's scale
        y = module.gemm16(x, *ops)
        assert torch.equal(y, cpu_ops.int16_twin(x, q.packed))
        alone = torch.cat([module.gemm16(x[i : i + 1], *ops) for i in range(rows)])
        assert torch.equal(alone, y)


def test_closer_to_the_exact_product_than_the_bf16_kernel():
    module = module_or_skip()
    q = layer(576, 96, -1, 3)
    x = torch.randn(16, 576, generator=torch.Generator().manual_seed(2))
    x[:, 7] *= 50
    exact = x.double() @ q.packed.dequantize(torch.float64)
    error = lambda y: float((y.double() - exact).norm() / exact.norm())  # noqa: E731
    int16 = error(module.gemm16(x, *cpu_decode.gemm16_operands(q)))
    assert int16 < 1e-3 and int16 < error(cpu_ops.int4_twin(x, q.packed)) / 5


def test_a_row_with_an_inf_or_a_nan_comes_out_nan_and_alone():
    """As from torch's kernel (and the twin): the engine ends such a row on its non-finite
    logits; the other rows are untouched."""
    module = module_or_skip()
    q = layer(64, 32, -1, 3)
    ops = cpu_decode.gemm16_operands(q)
    x = torch.randn(3, 64, generator=torch.Generator().manual_seed(3))
    clean = module.gemm16(x, *ops)
    x[0, 9], x[2, 4] = float("inf"), float("nan")
    y = module.gemm16(x, *ops)
    assert y[0].isnan().all() and y[2].isnan().all() and torch.equal(y[1], clean[1])
    assert cpu_ops.int16_twin(x, q.packed)[[0, 2]].isnan().all()


def test_a_layer_it_cannot_take_gets_no_operands():
    assert cpu_decode.gemm16_operands(layer(64, 32, -1, 4)) == []  # 4-bit codes: not centred
    assert cpu_decode.gemm16_operands(layer(64, 40, -1, 3)) == []  # outputs not in 16s


@pytest.mark.parametrize("kind", ["llama", "qwen3"])
def test_the_compiled_step_on_it_equals_the_eager_blocks_on_its_twin(kind, monkeypatch):
    module_or_skip()
    slots = torch.tensor([0, 1, 2, 1])
    monkeypatch.setenv(cpu_decode.GEMM, "bf16")
    rt, tokens = setup(kind, -1, 3, table_dtype=torch.float32)
    assert not rt.fused.gemm16
    bf16, *_ = eager_and_fused(rt, tokens, slots)
    monkeypatch.delenv(cpu_decode.GEMM)  # the default where the CPU has it
    rt.prepare(packed=True)
    assert rt.fused.gemm16
    fused, eager, fused_cache, eager_cache = eager_and_fused(rt, tokens, slots)  # eager: twin
    scale = float(eager.abs().max())
    # an fp32 difference in the last bit of an input may round it to the next int16 step (1/32767
    # of its row's largest): 6e-5 of the logits here, where the bf16 kernel's flips reach 2e-3
    torch.testing.assert_close(fused, eager, rtol=0, atol=2e-4 * scale)
    for a, b in zip(fused_cache.k + fused_cache.v, eager_cache.k + eager_cache.v, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=2e-4 * float(b.abs().max()))
    assert float((fused - bf16).abs().max()) > 1e-3 * scale  # the kernel ran, not the bf16 one
