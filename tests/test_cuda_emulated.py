"""Every CUDA kernel through `cuda_ops` on the CPU emulator (`../shared/cuemu`), against the twins.

No GPU needed: `cuda_ops.use_backend(EmulatedBackend(...))` is the only seam, so the argument
checks, row templates, split-K plan, grid chunking, tickets and argument tuples are owq's own.
Inputs and every buffer the launch code allocates end at guard pages. Matrix: bits 2/3/4 x
groups -1/32/64/128 x M 1-8, 9, 16, 33, 128 x shapes with odd `out` and `out % 8 != 0` x
k 0/8/130 x slot mixes (int32 and int64) x misaligned views x bfloat16 activations, split-K
under several SM counts and schedules, grid limits, bad slot ids and indices; 4096x11008 is
`slow`. The last test counts that every kernel entry point was launched. Skipped, saying why,
where `../shared/cuemu` or g++ is absent.
"""

from __future__ import annotations

import itertools

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
from test_cuda_emulator import CUEMU_MISSING

from owq.kernels import cuda_ops, cuda_twins
from owq.kernels.types import PackedWeight, WeakColumns

if CUEMU_MISSING:
    pytest.skip(CUEMU_MISSING, allow_module_level=True)

from test_cuda_emulator import EmulatedBackend, check, emulator_session, guarded, run  # noqa: E402

SHAPES = [(128, 256), (256, 260), (256, 1030), (96, 37)]  # out % 8 != 0, out % 4 != 0, odd
GROUPS = (-1, 32, 64, 128)


@pytest.fixture(scope="module", autouse=True)
def one_thread_and_built_modules():
    yield from emulator_session()


def _valid(shape, group):
    return group == -1 or shape[0] % group == 0


# the fused GEMV (decode) --------------------------------------------------------------------
GEMV_CASES = (
    [
        (bits, group, shape, m, (0, 8, 130)[i % 3] if shape[0] > 130 else (0, 8)[i % 2])
        for i, (bits, group, shape, m) in enumerate(
            itertools.product((2, 3, 4), GROUPS, SHAPES, (1, 3, 5, 8))
        )
        if _valid(shape, group)
    ]
    + [(b, 128, (256, 260), m, 8) for b in (2, 3, 4) for m in range(1, 9)]
    + [(2, 32, (96, 37), m, 8) for m in (2, 7)]
)


@pytest.mark.parametrize("bits,group,shape,m,k", GEMV_CASES, ids=str)
def test_gemv_matches_twin(bits, group, shape, m, k):
    check("dequant_gemv", make_layer(*shape, bits, group, k, True), m, bias=(m + k) % 2 == 0)


# owq_matmul over M: chunked GEMV (9..32) and dequantize + matmul + SGMV (> 32) ----------------
ROWS_CASES = [
    (bits, GROUPS[i % 4] if shape[0] % 128 == 0 else (-1, 32)[i % 2], shape, m, (0, 8, 130)[i % 3])
    for i, (bits, shape, m) in enumerate(
        itertools.product((2, 3, 4), [(256, 260), (160, 37)], (9, 16, 33, 128))
    )
]


@pytest.mark.parametrize("bits,group,shape,m,k", ROWS_CASES, ids=str)
def test_owq_matmul_rows_match_twin(bits, group, shape, m, k):
    check("owq_matmul", make_layer(*shape, bits, group, k, True), m, mix="random", seed=m)


# per-row adapter slots ------------------------------------------------------------------------
SLOT_CASES = [
    (shape, m, k, mix)
    for i, (m, k, mix) in enumerate(itertools.product((1, 3, 8, 9, 33), (8, 130), SLOT_MIXES))
    for shape in [[(256, 260), (160, 37)][i % 2]]
]


@pytest.mark.parametrize("shape,m,k,mix", SLOT_CASES, ids=str)
def test_slot_mixes_match_twin(shape, m, k, mix):
    group = 128 if shape[0] % 128 == 0 else -1
    check("owq_matmul", make_layer(*shape, 3, group, k, True), m, mix=mix, seed=k)


# dequantize: bit-exact --------------------------------------------------------------------------
DEQUANT_SHAPES = [(128, 256), (96, 100), (256, 1030), (64, 37), (32, 1)]
DEQUANT_CASES = [
    case
    for case in itertools.product((2, 3, 4), GROUPS, DEQUANT_SHAPES)
    if _valid(case[2], case[1])
]


@pytest.mark.parametrize("bits,group,shape", DEQUANT_CASES, ids=str)
def test_dequantize_is_bit_exact(bits, group, shape):
    layer = make_layer(*shape, bits, group, 0)
    with EmulatedBackend() as b, cuda_ops.use_backend(b):
        w = cuda_ops.dequantize_fp16(guarded(b, layer)[0])
        assert torch.equal(w, cuda_twins.dequantize_fp16(layer.packed))


# the SGMV directly (k = 0 with per-row slots: the twin must not be the one that fails) ------
SGMV_CASES = [
    (out, m, k, mix, i % 2 == 0)
    for i, (out, m, k, mix) in enumerate(
        itertools.product(
            (576, 100, 99), (1, 9, 40), (0, 8, 130), ("none", "distinct", "random", "int32")
        )
    )
]


@pytest.mark.parametrize("out,m,k,mix,accumulate", SGMV_CASES, ids=str)
def test_weak_columns_sgmv_matches_twin(out, m, k, mix, accumulate):
    layer = make_layer(160, out, 4, -1, k, True)
    x, slots = make_x(m, 160, k), make_slots(mix, m, NUM_SLOTS, k)
    base = make_x(m, out, seed=99) if accumulate else None
    with EmulatedBackend() as b, cuda_ops.use_backend(b):
        _, weak, bias, slots_ = guarded(b, layer, slots)
        y = cuda_ops.weak_columns_sgmv(b.guard(x, "x"), weak, slots_, bias, b.guard(base, "out"))
        y = y.clone()
    fp32 = WeakColumns(layer.outlier_idx, layer.weak_table.float())
    out_ = None if base is None else base.float()
    expected = cuda_twins.weak_columns_sgmv(x.float(), fp32, slots, layer.bias.float(), out_)
    assert_close(y, expected, max(k, 1))


# bfloat16 activations, also past float16's 65,504 -------------------------------------------
BF16_CASES = [(bits, (256, 260), m) for bits in (2, 3, 4) for m in (1, 2, 3, 8, 40)]
BF16_CASES += [(bits, (96, 37), m) for bits in (2, 3, 4) for m in (1, 5, 40)]


@pytest.mark.parametrize("bits,shape,m", BF16_CASES, ids=str)
def test_bfloat16_activations_beyond_float16_range(bits, shape, m):
    layer = make_layer(*shape, bits, 32, 8, True)
    x = make_x(m, shape[0], seed=m, dtype=torch.bfloat16)
    x[:, int(layer.outlier_idx[0])] = 1.0e5  # a weak column
    x[:, 1 if int(layer.outlier_idx[0]) != 1 else 2] = -7.0e4  # a dense one
    slots = make_slots("random", m, NUM_SLOTS, seed=m)
    y = run("owq_matmul", layer, x, slots)
    assert y.dtype == torch.bfloat16 and bool(torch.isfinite(y).all())
    assert_close(y, exact(x, layer, slots), shape[0], torch.bfloat16)


# the quantized vocabulary table (LM head): the same kernels, plus the protected rows -------
HEAD_CASES = [(vocab, bits, m) for vocab in (2048, 1030) for bits in (3, 4) for m in (1, 4, 40)]


@pytest.mark.parametrize("vocab,bits,m", HEAD_CASES, ids=str)
def test_quantized_head_logits_match_its_table(vocab, bits, m):
    from owq.kernels.owq_vocab import OWQVocab

    gen = torch.Generator().manual_seed(vocab + m)
    table = torch.randn(vocab, 576, generator=gen) * 0.05
    weak, protected = torch.tensor([3, 100, 501]), torch.tensor([0, 7, vocab - 1])
    head = OWQVocab.from_float_rows(table, bits, 32, weak, protected)
    x = make_x(m, 576, seed=m)
    y = head.protected_product(x, run("owq_matmul", head, x, bias=False))
    reference = x.float() @ head.dense_table().t()
    assert_close(y, reference, 576)
    assert torch.equal(y[:, protected], (x @ head.protected_weight.t()))  # fp16, as on a GPU


# misaligned views take the scalar ('any') kernels and stay right ---------------------------
def misaligned(b: EmulatedBackend, t: torch.Tensor) -> torch.Tensor:
    """The same values one element off the usual alignment, ending at a guard page."""
    flat = b.memory.empty((t.numel() + 1,), t.dtype, "misaligned")
    view = flat[1:].view(t.shape)
    view.copy_(t)
    return view


@pytest.mark.parametrize("m", [1, 8, 40])
@pytest.mark.parametrize("which", ["qweight", "scales", "bias", "table", "x"])
def test_misaligned_inputs_take_scalar_kernels(which, m):
    layer = make_layer(128, 256, 3, 32, 8, True)
    x, slots = make_x(m, 128, seed=m), make_slots("random", m, NUM_SLOTS, seed=m)
    with EmulatedBackend() as b, cuda_ops.use_backend(b):
        packed, weak, bias, slots_ = guarded(b, layer, slots)
        tensors = {"qweight": packed.qweight, "scales": packed.scales, "bias": bias}
        tensors |= {"table": weak.table, "x": b.guard(x, "x")}
        tensors[which] = misaligned(b, tensors[which])
        packed = PackedWeight(tensors["qweight"], tensors["scales"], packed.qzeros, 3, 32)
        weak = WeakColumns(weak.idx, tensors["table"])
        y = cuda_ops.owq_matmul(tensors["x"], packed, weak, tensors["bias"], slots_).clone()
        kernels = [name for name, *_ in b.launches]
    assert_close(y, exact(x, layer, slots), 128)
    reads = {"dequant_gemv": ("qweight", "scales", "bias", "table")}
    reads |= {"dequantize": ("qweight", "scales"), "weak_columns_sgmv": ("bias", "table")}
    for name in kernels:
        kind = next(k for k in reads if name.startswith(k))
        assert name.endswith("_any" if which in reads[kind] else "_vec"), (which, kernels)
