"""Pack/unpack round trips of the GPTQ-layout codes and zero points, and impossible shapes."""

import pytest
import torch

from owq.kernels.packing import (
    check_layout,
    dequantize,
    pack_codes,
    pack_zeros,
    unpack_codes,
    unpack_zeros,
)

SHAPES = [(32, 1), (64, 7), (96, 33), (128, 64), (256, 129)]


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("shape", SHAPES)
def test_codes_round_trip(bits, shape):
    gen = torch.Generator().manual_seed(bits * 1000 + shape[0] + shape[1])
    codes = torch.randint(0, 2**bits, shape, generator=gen)
    packed = pack_codes(codes, bits)
    assert packed.dtype == torch.int32
    assert tuple(packed.shape) == (shape[0] * bits // 32, shape[1])
    assert torch.equal(unpack_codes(packed, bits), codes)


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("value", ["zero", "max"])
def test_codes_extremes(bits, value):
    fill = 0 if value == "zero" else 2**bits - 1
    codes = torch.full((64, 5), fill)
    packed = pack_codes(codes, bits)
    assert torch.equal(unpack_codes(packed, bits), codes)
    expected_word = 0 if fill == 0 else -1  # every bit set: 32 values fill `bits` words exactly
    assert bool((packed == expected_word).all())


def test_three_bit_codes_straddle_words():
    codes = torch.zeros(32, 1, dtype=torch.int64)
    codes[10] = 7  # bits 30..32: two bits in word 0, one in word 1
    codes[21] = 7  # bits 63..65: one bit in word 1, two in word 2
    words = pack_codes(codes, 3)[:, 0].tolist()
    assert words[0] == -(2**31) + 2**30  # bits 30, 31 set
    assert words[1] == 1 | -(2**31)  # bit 32 -> bit 0 of word 1, bit 63 -> bit 31
    assert words[2] == 0b11


def test_four_bit_matches_gptq_layout():
    codes = torch.arange(16).reshape(16, 1) % 16
    codes = torch.cat([codes, codes]).reshape(32, 1)
    packed = pack_codes(codes, 4)
    word0 = sum(int(codes[j]) << (4 * j) for j in range(8))
    assert int(packed[0, 0]) & 0xFFFFFFFF == word0


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("out_features", [1, 31, 32, 33, 100])
def test_zeros_round_trip_odd_outputs(bits, out_features):
    gen = torch.Generator().manual_seed(out_features)
    zeros = torch.randint(0, 2**bits, (3, out_features), generator=gen)
    packed = pack_zeros(zeros, bits)
    assert tuple(packed.shape) == (3, -(-out_features // 32) * bits)
    assert torch.equal(unpack_zeros(packed, bits, out_features), zeros)


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("group_size", [-1, 32, 64, 128])
def test_dequantize_matches_formula(bits, group_size):
    gen = torch.Generator().manual_seed(7)
    in_f, out_f = 256, 19
    groups = 1 if group_size == -1 else in_f // group_size
    codes = torch.randint(0, 2**bits, (in_f, out_f), generator=gen)
    zeros = torch.randint(0, 2**bits, (groups, out_f), generator=gen)
    scales = torch.rand(groups, out_f, generator=gen).half() + 0.01
    w = dequantize(pack_codes(codes, bits), scales, pack_zeros(zeros, bits), bits, group_size)
    g = torch.arange(in_f) // (in_f if group_size == -1 else group_size)
    expected = (codes - zeros[g]).float() * scales.float()[g]
    assert torch.equal(w, expected)


@pytest.mark.parametrize(
    ("in_f", "out_f", "bits", "group", "needle"),
    [
        (48, 8, 4, -1, "in_features=48"),
        (64, 8, 5, -1, "bits"),
        (64, 8, 3, 128, "group_size=128"),
        (64, 8, 3, 48, "group_size"),
        (0, 8, 3, -1, "positive"),
    ],
)
def test_impossible_shapes_raise(in_f, out_f, bits, group, needle):
    with pytest.raises(ValueError, match=needle):
        check_layout(in_f, out_f, bits, group)


def test_pack_rejects_bad_codes_and_shapes():
    with pytest.raises(ValueError, match="in_features=40"):
        pack_codes(torch.zeros(40, 3, dtype=torch.int64), 4)
    with pytest.raises(ValueError, match=r"\[0, 7\]"):
        pack_codes(torch.full((32, 3), 8), 3)
    with pytest.raises(ValueError, match="qzeros has shape"):
        unpack_zeros(torch.zeros(1, 4, dtype=torch.int32), 3, 32)
