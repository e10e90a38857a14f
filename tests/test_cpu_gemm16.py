"""The 16-bit GEMM of CPU fast steps (`kernels/cpu_gemm16.cpp`): both forms (AVX-512 VNNI,
AVX2) bit for bit its twin (`cpu_gemm16.twin`) at every shape, bit width, group size and row
count, each row the same alone as in a batch, closer to the fp64 product than the bf16 kernel;
layers take it through their plans, the head included, and the compiled step on it equals the
eager blocks on it. The kernel needs AVX2 and FMA (its VNNI form AVX-512 VNNI): those tests
run where the CPU has them (the layout and `takes` tests run everywhere)."""

import os
import subprocess
import sys

import pytest
import torch
from test_cpu_decode import eager_and_fused, setup

from owq.kernels import OWQLinear, cpu_build, cpu_gemm16, cpu_ops
from owq.kernels.owq_vocab import OWQVocab


def module_or_skip():
    module = cpu_build.gemm16()
    if module is None:
        pytest.skip("the 16-bit GEMM needs AVX2 and FMA (and the compiled module)")
    return module


def forms(module) -> list[int]:
    """The forms this CPU runs, each asked for (1 AVX2, 2 VNNI, 3 AMX from 5 rows on), and the
    default (0: the widest)."""
    return [0, *range(1, module.gemm16_level() + 1)]


def layer(k: int, n: int, group_size: int, bits: int, seed: int = 0) -> OWQLinear:
    gen = torch.Generator().manual_seed(seed)
    weight = torch.randn(n, k, generator=gen)
    return OWQLinear.from_float(weight, bits, group_size, torch.tensor([1, 5]))


def product(x, q: OWQLinear) -> torch.Tensor:
    return cpu_gemm16.mm(x, cpu_gemm16.weight(q.packed))


def weak_part(x, q: OWQLinear) -> torch.Tensor:
    return x[:, q.outlier_idx.long()] @ q.oweight.float()


def test_the_layout_puts_each_lanes_pairs_in_its_nibbles():
    n, k = 32, 8
    codes = torch.arange(n * k, dtype=torch.int32).view(n, k) % 16
    packed = cpu_gemm16.pack(codes)
    assert packed.shape == (2, 2, 32) and packed.dtype == torch.uint8
    for block, step, lane, j in [(0, 0, 0, 0), (1, 1, 15, 1), (0, 1, 7, 0), (1, 0, 3, 1)]:
        row, col = 16 * block + lane, 4 * step + j
        byte = int(packed[block, step, 2 * lane + j])
        assert (byte & 15, byte >> 4) == (int(codes[row, col]), int(codes[row, col + 2]))


def test_the_operands_are_the_layers_codes_zeros_and_scales():
    """Unpacked a chunk of outputs at a time: two whole chunks and a ragged third."""
    q = layer(64, 2 * 1024 + 80, 32, 4)
    ops = cpu_gemm16.weight(q.packed)
    codes, zeros, _ = cpu_ops.layer_codes(q.packed)
    assert torch.equal(ops.codes, cpu_gemm16.pack(codes))
    assert torch.equal(ops.zeros.long().repeat_interleave(32, 0).t(), zeros.long())
    assert torch.equal(ops.scales, q.packed.scales.float())


@pytest.mark.parametrize(
    "k,n,group_size,bits",
    [
        (64, 32, -1, 3), (64, 48, 32, 3), (576, 96, -1, 3), (96, 16, 32, 2), (1536, 64, 128, 3),
        (576, 64, 32, 4), (256, 32, -1, 4), (128, 16, 64, 2),
    ],
)  # fmt: skip
def test_the_kernel_is_its_twin_bit_for_bit(k, n, group_size, bits):
    module = module_or_skip()
    q = layer(k, n, group_size, bits)
    ops = cpu_gemm16.weight(q.packed)
    gen = torch.Generator().manual_seed(1)
    for rows in (1, 3, 8, 9, 17):  # every tile height (8 and 4 rows), and a third pass
        x = torch.randn(rows, k, generator=gen)
        x[:, 3] *= 40  # an activation outlier sets each row's scale
        want = cpu_gemm16.twin(x, q.packed)
        for form in forms(module):
            y = cpu_gemm16.mm(x, ops, form)
            assert torch.equal(y, want), form
            alone = torch.cat([cpu_gemm16.mm(x[i : i + 1], ops, form) for i in range(rows)])
            assert torch.equal(alone, y), form


@pytest.mark.parametrize("cap,form", [("avx2", 1), ("vnni", 2)])
def test_the_environment_caps_the_form(cap, form):
    """Read once by the module: a fresh process."""
    module = module_or_skip()
    code = "from owq.kernels import cpu_build; print(cpu_build.gemm16().gemm16_level())"
    env = dict(os.environ, **{cpu_build.GEMM: cap})
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    assert int(done.stdout.split()[-1]) == min(form, module.gemm16_level())


@pytest.mark.parametrize("group_size,bits", [(-1, 3), (32, 4)])
def test_closer_to_the_exact_product_than_the_bf16_kernel(group_size, bits):
    module_or_skip()
    q = layer(576, 96, group_size, bits)
    x = torch.randn(16, 576, generator=torch.Generator().manual_seed(2))
    x[:, 7] *= 50
    exact = x.double() @ q.packed.dequantize(torch.float64)
    error = lambda y: float((y.double() - exact).norm() / exact.norm())  # noqa: E731
    int16 = error(product(x, q))
    assert int16 < 1e-3 and int16 < error(cpu_ops.int4_twin(x, q.packed)) / 5


def test_a_row_with_an_inf_or_a_nan_comes_out_nan_and_alone():
    """As from torch's kernel (and the twin): the engine ends such a row on its non-finite
    logits; the other rows are untouched."""
    module_or_skip()
    q = layer(64, 32, -1, 3)
    x = torch.randn(3, 64, generator=torch.Generator().manual_seed(3))
    clean = product(x, q)
    x[0, 9], x[2, 4] = float("inf"), float("nan")
    y = product(x, q)
    assert y[0].isnan().all() and y[2].isnan().all() and torch.equal(y[1], clean[1])
    assert cpu_gemm16.twin(x, q.packed)[[0, 2]].isnan().all()


def test_the_layers_it_takes():
    assert cpu_gemm16.takes(layer(64, 32, 32, 4).packed)
    assert not cpu_gemm16.takes(layer(64, 40, -1, 3).packed)  # outputs not in 16s
    assert not cpu_gemm16.takes(layer(64, 32, -1, 8).packed)  # codes wider than a nibble
    # a group's sum could leave int32: 15 · 32767 · 4384 > 2^31 at 4 bits, not 7 · ... at 3
    assert not cpu_gemm16.takes(layer(4384, 16, -1, 4).packed)
    assert cpu_gemm16.takes(layer(4384, 16, -1, 3).packed)


def test_a_layers_plan_takes_it_and_bf16_turns_it_off(monkeypatch):
    module_or_skip()
    q = layer(64, 32, 32, 4)
    plan = q.prepare(torch.float32, int4=True, resident=False)
    assert plan.kernel == "int16" and plan.int4 is None and plan.weight is None  # one layout
    x = torch.randn(2, 64, generator=torch.Generator().manual_seed(4))
    want = cpu_gemm16.twin(x, q.packed) + weak_part(x, q)
    torch.testing.assert_close(q(x, fast=True), want, rtol=1e-6, atol=1e-6)
    assert torch.equal(cpu_ops.fast_twin(x, plan, q.packed), cpu_gemm16.twin(x, q.packed))
    monkeypatch.setenv(cpu_build.GEMM, "bf16")
    assert q.prepare(torch.float32, int4=True, resident=False).kernel == "int4"


def test_the_head_takes_it_with_its_protected_rows():
    """The 4-bit head in groups of 32 (the default's) on the kernel; protected rows from fp16."""
    module_or_skip()
    gen = torch.Generator().manual_seed(5)
    table = torch.randn(160, 64, generator=gen)
    head = OWQVocab.from_float_rows(table, 4, 32, torch.tensor([2]), torch.tensor([3, 77]))
    head.prepare(torch.float32, int4=True, resident=False)
    assert head.cpu.kernel == "int16"
    x = torch.randn(4, 64, generator=gen)
    want = cpu_gemm16.twin(x, head.packed) + weak_part(x, head)
    want[:, [3, 77]] = x @ head.protected_weight.float().t()
    torch.testing.assert_close(head(x), want, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("kind", ["llama", "qwen3"])
def test_the_compiled_step_on_it_equals_the_eager_blocks_on_it(kind, monkeypatch):
    module_or_skip()
    slots = torch.tensor([0, 1, 2, 1])
    monkeypatch.setenv(cpu_build.GEMM, "bf16")
    rt, tokens = setup(kind, -1, 3, table_dtype=torch.float32)
    assert not rt.fused.gemm16
    bf16, *_ = eager_and_fused(rt, tokens, slots)
    monkeypatch.delenv(cpu_build.GEMM)  # the default where the CPU has it
    rt.prepare(packed=True)
    assert rt.fused.gemm16
    fused, eager, fused_cache, eager_cache = eager_and_fused(rt, tokens, slots)
    scale = float(eager.abs().max())
    # an fp32 difference in the last bit of an input may round it to the next int16 step (1/32767
    # of its row's largest): 6e-5 of the logits here, where the bf16 kernel's flips reach 2e-3
    torch.testing.assert_close(fused, eager, rtol=0, atol=2e-4 * scale)
    for a, b in zip(fused_cache.k + fused_cache.v, eager_cache.k + eager_cache.v, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=2e-4 * float(b.abs().max()))
    assert float((fused - bf16).abs().max()) > 1e-3 * scale  # the kernel ran, not the bf16 one
