"""Packed storage of 2/3/4-bit OWQ weights in the GPTQ layout; knows nothing of models.

Layout (format_version 1), for a linear layer with ``in_features`` inputs and ``out_features``
outputs, codes ``q[i, o]`` in ``[0, 2**bits)``:

- ``qweight``: int32 ``[in_features * bits / 32, out_features]``. The input dimension is cut into
  blocks of 32 consecutive inputs; block ``t`` owns words ``t*bits .. t*bits + bits - 1`` of each
  column. Input ``i = 32*t + j`` lives at bits ``[j*bits, (j+1)*bits)`` of the little-endian
  concatenation of those words, so 3-bit codes 10 and 21 straddle word boundaries (32 values in 3
  words) and 2/4-bit codes match GPTQ exactly. ``in_features`` must be a multiple of 32.
- ``scales``: float16 ``[groups, out_features]``; ``groups = 1`` for group size -1 (per output
  channel), else ``in_features / group_size`` (32, 64 or 128; input ``i`` is in group
  ``i // group_size``, in the layer's own input order: no ``g_idx``).
- ``qzeros``: zero points are stored as integer codes, packed: int32
  ``[groups, ceil(out_features / 32) * bits]``, the output dimension cut into blocks of 32 with
  the same bit rule as ``qweight`` and padded with zeros. There is no "-1" offset (unlike GPTQ's
  v1 format): the stored code is the zero point. Integer zeros keep the file small and make
  the weak-column rows exact (their code is the zero point, which dequantizes to exactly 0).
- dequantization: ``W[i, o] = (q[i, o] - z[g(i), o]) * s[g(i), o]``.
"""

from __future__ import annotations

import torch

SUPPORTED_BITS = (2, 3, 4, 8)
SUPPORTED_GROUP_SIZES = (-1, 32, 64, 128)
BLOCK = 32


def check_layout(in_features: int, out_features: int, bits: int, group_size: int) -> None:
    """Raise ValueError when the packed layout cannot hold this shape."""
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"bits must be one of {SUPPORTED_BITS}, got {bits}")
    if group_size not in SUPPORTED_GROUP_SIZES:
        raise ValueError(f"group_size must be one of {SUPPORTED_GROUP_SIZES}, got {group_size}")
    if in_features <= 0 or out_features <= 0:
        raise ValueError(f"shape must be positive, got in={in_features} out={out_features}")
    if in_features % BLOCK:
        raise ValueError(
            f"in_features={in_features} is not a multiple of {BLOCK}: the packed layout "
            f"stores 32 inputs per {bits} int32 words"
        )
    if group_size > 0 and in_features % group_size:
        raise ValueError(f"in_features={in_features} is not a multiple of group_size={group_size}")


def num_groups(in_features: int, group_size: int) -> int:
    return 1 if group_size == -1 else in_features // group_size


def group_index(
    in_features: int, group_size: int, device: torch.device | str | None = None
) -> torch.Tensor:
    """long [in]: the group of each input row, i // group_size (one group for -1; no g_idx)."""
    size = in_features if group_size == -1 else group_size
    return torch.arange(in_features, device=device) // size


def stored_layout(qweight: torch.Tensor, scales: torch.Tensor, qzeros: torch.Tensor) -> tuple:
    """(in_features, out_features, bits, group_size) of stored packed tensors: qzeros holds
    ceil(out/32)·bits words per group, so bits follow from the shapes alone."""
    groups, out_features = scales.shape
    bits = qzeros.shape[1] // -(-out_features // BLOCK)
    in_features = qweight.shape[0] * BLOCK // bits
    return in_features, out_features, bits, -1 if groups == 1 else in_features // groups


def _pack_rows(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """codes: int [R, C] with R % 32 == 0 -> int32 [R * bits / 32, C], bitstream along R."""
    rows, cols = codes.shape
    blocks = codes.to(torch.int64).reshape(rows // BLOCK, BLOCK, cols)
    words = torch.zeros(rows // BLOCK, bits, cols, dtype=torch.int64)
    for j in range(BLOCK):
        offset = j * bits
        word, shift = divmod(offset, 32)
        value = blocks[:, j]
        words[:, word] |= (value << shift) & 0xFFFFFFFF
        if shift + bits > 32:
            words[:, word + 1] |= value >> (32 - shift)
    words = words.reshape(rows * bits // BLOCK, cols)
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def _unpack_plan(bits: int, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """For input j of a 32-block: (its word, the next word, its shift) as index tensors."""
    offsets = torch.arange(BLOCK, device=device) * bits
    word, shift = offsets // 32, offsets % 32
    return word, (word + 1).clamp(max=bits - 1), shift


def _unpack_rows(words: torch.Tensor, bits: int, chunk: int = 4096) -> torch.Tensor:
    """words: int32 [R * bits / 32, C] -> int64 codes [R, C], in a handful of ops per chunk of
    columns: code_j = ((w[word_j] >> shift_j) | (w[word_j + 1] << (32 - shift_j))) & mask (the
    high part is masked away unless the code straddles two words)."""
    nwords, cols = words.shape
    mask = (1 << bits) - 1
    word, nxt, shift = _unpack_plan(bits, words.device)
    shift = shift[None, :, None]
    out = torch.empty(nwords // bits, BLOCK, cols, dtype=torch.int64, device=words.device)
    for start in range(0, cols, chunk):
        w = (words[:, start : start + chunk].to(torch.int64) & 0xFFFFFFFF).reshape(
            nwords // bits, bits, -1
        )
        lo, hi = w[:, word] >> shift, w[:, nxt] << (32 - shift)
        out[:, :, start : start + chunk] = (lo | hi) & mask
    return out.reshape(nwords // bits * BLOCK, cols)


def _check_codes(codes: torch.Tensor, bits: int, what: str) -> None:
    if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) >= 2**bits):
        raise ValueError(f"{what} must lie in [0, {2**bits - 1}] for {bits}-bit codes")


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """codes: int [in, out] in [0, 2**bits) -> qweight int32 [in * bits / 32, out]."""
    in_features, out_features = codes.shape
    check_layout(in_features, out_features, bits, -1)
    _check_codes(codes, bits, "codes")
    return _pack_rows(codes.cpu(), bits).to(codes.device)


def unpack_codes(qweight: torch.Tensor, bits: int) -> torch.Tensor:
    """qweight: int32 [in * bits / 32, out] -> int64 codes [in, out]."""
    if qweight.dim() != 2 or qweight.shape[0] % bits:
        raise ValueError(f"qweight rows {tuple(qweight.shape)} are not a multiple of bits={bits}")
    return _unpack_rows(qweight, bits)


def pack_zeros(zeros: torch.Tensor, bits: int) -> torch.Tensor:
    """zeros: int [groups, out] -> qzeros int32 [groups, ceil(out / 32) * bits]."""
    groups, out_features = zeros.shape
    _check_codes(zeros, bits, "zero points")
    padded = -(-out_features // BLOCK) * BLOCK
    full = torch.zeros(groups, padded, dtype=torch.int64)
    full[:, :out_features] = zeros.cpu().to(torch.int64)
    return _pack_rows(full.t().contiguous(), bits).t().contiguous().to(zeros.device)


def unpack_zeros(qzeros: torch.Tensor, bits: int, out_features: int) -> torch.Tensor:
    """qzeros: int32 [groups, ceil(out / 32) * bits] -> int64 zeros [groups, out]."""
    expected = -(-out_features // BLOCK) * bits
    if qzeros.dim() != 2 or qzeros.shape[1] != expected:
        raise ValueError(
            f"qzeros has shape {tuple(qzeros.shape)}, expected [groups, {expected}] "
            f"for out_features={out_features} at {bits} bits"
        )
    return _unpack_rows(qzeros.t().contiguous(), bits).t()[:, :out_features]


def dequantize(
    qweight: torch.Tensor,
    scales: torch.Tensor,
    qzeros: torch.Tensor,
    bits: int,
    group_size: int,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Dense weight [in, out] from the packed parts: (q - z[g(i)]) * s[g(i)]."""
    in_features, out_features = qweight.shape[0] * 32 // bits, qweight.shape[1]
    zeros = unpack_zeros(qzeros, bits, out_features)
    groups = group_index(in_features, group_size, qweight.device)
    dense = torch.empty(in_features, out_features, dtype=dtype, device=qweight.device)
    for cols in column_chunks(out_features):  # int64 temporaries of a chunk, not of the layer
        centered = (unpack_codes(qweight[:, cols], bits) - zeros[:, cols][groups]).float()
        dense[:, cols] = centered * scales[:, cols].float()[groups]
    return dense


def column_chunks(columns: int, chunk: int = 1024) -> list[slice]:
    """Slices of at most `chunk` output columns: a wide layer (an LM head of 49,152 rows) is
    unpacked a chunk at a time, so its int64 temporaries stay a few MiB, not GiBs."""
    return [slice(start, min(start + chunk, columns)) for start in range(0, columns, chunk)]
