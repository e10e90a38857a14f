// Fused 2/3/4-bit OWQ dequant-GEMV (decode, up to 8 rows per row chunk) and dequantize.
//
// Layout: kernels/packing.py, format_version 1 (qweight int32 [in*BITS/32, out], 32 inputs per
// BITS words of a column; scales fp16 [G, out]; qzeros int32 [G, ceil(out/32)*BITS] packed along
// the output dim). Compiled by CuPy RawModule (NVRTC) and by the compile checks with the same
// options (cuda_build.COMPILE_OPTIONS: -I finds owq_cuda.cuh). x and y are the module's
// activation type (fp16, or bf16 under -DOWQ_ACT_BF16). Knows nothing of torch, models or
// adapters beyond "slot 0 = oweight, slot s = table[s-1]"; a slot id outside [0, num_slots] or a
// weak column index outside [0, in) makes its row NaN (never another adapter's columns).
//
// dequant_gemv_<BITS>_<MT>_<VEC>: grid (ceil(out/256), nsplit, ceil(M/MT)), block (64, 4).
//   threadIdx.x owns 4 consecutive output columns (one 128-bit load per packed word row, so a
//   warp reads 512 contiguous bytes), threadIdx.y is one of 4 K slices inside the block,
//   blockIdx.y one of nsplit K splits (bps 32-input blocks each), blockIdx.z a chunk of MT rows.
//   x of the split is staged in shared memory as fp32, pre-multiplied by 2^-shift so a code can be
//   turned into a float with one LOP3 + one FADD while still sitting at its bit offset.
//   Per 32-input block: acc = sum_i x_i q_i (fp32), then y += s * acc - s * z * sum_i x_i.
//   The weak columns of the split's share of k are added before the reduction (same launch).
//   Splits write fp32 partials; the last block of a column tile (atomic ticket) sums them in
//   split order (deterministic for one launch plan: the plan depends on the SM count, so bits
//   are reproducible per device model), adds bias, writes y and resets its ticket to 0.

#include "owq_cuda.cuh"

#define TILE_THREADS 64
#define TILE_COLS (TILE_THREADS * COLS)
#define KSLICES 4
#define GEMV_THREADS (TILE_THREADS * KSLICES)
#define DEQ_THREADS 128

// Power of two by which code j (0..31) of a 32-input block is scaled once decoded in place.
__host__ __device__ constexpr int code_shift(int bits, int j) {
  return ((j * bits) & 31) + bits > 32   ? 0
         : ((j * bits) & 31) + bits <= 16 ? ((j * bits) & 31)
         : ((j * bits) & 31) >= 16        ? ((j * bits) & 31) - 16
                                          : 0;
}

__device__ __forceinline__ float exp2_neg(int e) { return __uint_as_float((127u - e) << 23); }

// Code j of one column's BITS words, as the exact float q * 2^code_shift(BITS, j).
template <int BITS>
__device__ __forceinline__ float decode_code(const u32 (&w)[BITS], int j) {
  const int off = j * BITS, wi = off >> 5, sh = off & 31;
  const u32 mask = (1u << BITS) - 1u;
  u32 v;
  if (sh + BITS > 32) {
    v = __funnelshift_r(w[wi], w[(wi + 1) % BITS], sh) & mask;
  } else if (sh + BITS <= 16) {
    v = w[wi] & (mask << sh);
  } else if (sh >= 16) {
    v = (w[wi] >> 16) & (mask << (sh - 16));
  } else {
    v = (w[wi] >> sh) & mask;
  }
  return __uint_as_float(v | 0x4B000000u) - 8388608.0f;
}

// Zero code of output column jj (0..31) of a 32-column block whose BITS words start at zrow.
template <int BITS>
__device__ __forceinline__ float zero_code(const u32* __restrict__ zrow, int jj) {
  const int off = jj * BITS, wi = off >> 5, sh = off & 31;
  u32 v = __ldg(zrow + wi) >> sh;
  if (sh + BITS > 32) v |= __ldg(zrow + wi + 1) << (32 - sh);
  return (float)(v & ((1u << BITS) - 1u));
}

// Packed words of 32-input block `blk` for columns c0..c0+3: w[c][r] = qweight[blk*BITS + r][c0+c].
template <int BITS, bool VEC>
__device__ __forceinline__ void load_words(const u32* __restrict__ qweight, int blk, int out,
                                           int c0, u32 (&w)[COLS][BITS]) {
#pragma unroll
  for (int r = 0; r < BITS; ++r) {
    const u32* row = qweight + (u64)(blk * BITS + r) * out + c0;
    if (VEC) {
      const uint4 v = __ldg(reinterpret_cast<const uint4*>(row));
      w[0][r] = v.x;
      w[1][r] = v.y;
      w[2][r] = v.z;
      w[3][r] = v.w;
    } else {
#pragma unroll
      for (int c = 0; c < COLS; ++c) w[c][r] = c0 + c < out ? __ldg(row + c) : 0u;
    }
  }
}

// Scales and integer zero points of group g for columns c0..c0+3 (0 past the end).
template <int BITS, bool VEC>
__device__ __forceinline__ void load_scale_zero(const f16* __restrict__ scales,
                                                const u32* __restrict__ qzeros, int g, int out,
                                                int c0, float (&s)[COLS], float (&z)[COLS]) {
  load4<Fp16, VEC>(scales + (u64)g * out, c0, out, s);
  const u32* zrow = qzeros + (u64)g * (((out + 31) >> 5) * BITS) + (c0 >> 5) * BITS;
#pragma unroll
  for (int c = 0; c < COLS; ++c) z[c] = c0 + c < out ? zero_code<BITS>(zrow, (c0 + c) & 31) : 0.0f;
}

// y[row, c0..c0+3] = v (+ bias), rounded once to the activation type.
template <bool VEC>
__device__ __forceinline__ void store_row(act_t* __restrict__ y, const f16* __restrict__ bias,
                                          u64 row_off, int c0, int out, float (&v)[COLS]) {
  float b[COLS] = {0.0f, 0.0f, 0.0f, 0.0f};
  if (bias != nullptr) load4<Fp16, VEC>(bias, c0, out, b);
#pragma unroll
  for (int c = 0; c < COLS; ++c) b[c] += v[c];
  store4<Act, VEC>(y + row_off, c0, out, b);
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xFFFFFFFFu, v, o);
  return v;
}

// Stage rows row0..row0+MT-1 of x[:, blk0*32 : (blk0+nb)*32] as fp32 scaled by 2^-code_shift,
// plus the unscaled sum of every 32-input block: xs [MT][nb*32], xsum [MT][nb].
template <int BITS, int MT>
__device__ __forceinline__ void stage_x(const act_t* __restrict__ x, float* xs, float* xsum, int M,
                                        int in, int row0, int blk0, int nb, int tid) {
  const int xlen = nb * 32;
  for (int e = tid; e < MT * xlen; e += GEMV_THREADS) {  // whole warps: MT*xlen % 32 == 0
    const int m = e / xlen, i = e - m * xlen, row = row0 + m;
    const float v = row < M ? Act::get(x[(u64)row * in + blk0 * 32 + i]) : 0.0f;
    xs[e] = v * exp2_neg(code_shift(BITS, i & 31));
    const float sum = warp_sum(v);
    if ((i & 31) == 0) xsum[m * nb + (i >> 5)] = sum;
  }
}

template <int BITS, int MT, bool VEC>
__device__ __forceinline__ void gemv_body(
    const act_t* __restrict__ x, const u32* __restrict__ qweight, const f16* __restrict__ scales,
    const u32* __restrict__ qzeros, const int* __restrict__ outlier_idx,
    const f16* __restrict__ oweight, const f16* __restrict__ table,
    const long long* __restrict__ slots, const f16* __restrict__ bias, act_t* __restrict__ y,
    float* __restrict__ partial, u32* __restrict__ tickets, int M, int in, int out, int k,
    int num_slots, int group_blocks, int bps) {
  extern __shared__ __align__(16) float smem[];
  __shared__ int is_last;
  const int tx = threadIdx.x, ty = threadIdx.y, tid = ty * TILE_THREADS + tx;
  const int split = blockIdx.y, nsplit = gridDim.y, row0 = blockIdx.z * MT;
  const int c0 = blockIdx.x * TILE_COLS + tx * COLS;
  const bool active = c0 < out;
  const int nblk = in >> 5, blk0 = split * bps, nb = min(bps, nblk - blk0);
  float* xs = smem;
  float* xsum = smem + MT * nb * 32;
  stage_x<BITS, MT>(x, xs, xsum, M, in, row0, blk0, nb, tid);
  __syncthreads();

  float yacc[MT][COLS];
#pragma unroll
  for (int m = 0; m < MT; ++m)
#pragma unroll
    for (int c = 0; c < COLS; ++c) yacc[m][c] = 0.0f;

  const int per = (nb + KSLICES - 1) / KSLICES, b_lo = ty * per, b_hi = min(nb, b_lo + per);
  int cur_g = -1;
  float s[COLS], sz[COLS];
  for (int b = b_lo; active && b < b_hi; ++b) {
    const int blk = blk0 + b, g = group_blocks > 0 ? blk / group_blocks : 0;
    u32 w[COLS][BITS];
    load_words<BITS, VEC>(qweight, blk, out, c0, w);
    if (g != cur_g) {
      float z[COLS];
      load_scale_zero<BITS, VEC>(scales, qzeros, g, out, c0, s, z);
#pragma unroll
      for (int c = 0; c < COLS; ++c) sz[c] = s[c] * z[c];
      cur_g = g;
    }
    float acc[MT][COLS];
#pragma unroll
    for (int m = 0; m < MT; ++m)
#pragma unroll
      for (int c = 0; c < COLS; ++c) acc[m][c] = 0.0f;
#pragma unroll
    for (int j4 = 0; j4 < 32; j4 += 4) {
      float4 xv[MT];
#pragma unroll
      for (int m = 0; m < MT; ++m)
        xv[m] = *reinterpret_cast<const float4*>(xs + m * nb * 32 + b * 32 + j4);
#pragma unroll
      for (int jj = 0; jj < 4; ++jj) {
#pragma unroll
        for (int c = 0; c < COLS; ++c) {
          const float q = decode_code<BITS>(w[c], j4 + jj);
#pragma unroll
          for (int m = 0; m < MT; ++m) {
            const float xj = jj == 0 ? xv[m].x : jj == 1 ? xv[m].y : jj == 2 ? xv[m].z : xv[m].w;
            acc[m][c] = fmaf(xj, q, acc[m][c]);
          }
        }
      }
    }
#pragma unroll
    for (int m = 0; m < MT; ++m) {
      const float xm = xsum[m * nb + b];
#pragma unroll
      for (int c = 0; c < COLS; ++c) yacc[m][c] = fmaf(s[c], acc[m][c], fmaf(-sz[c], xm, yacc[m][c]));
    }
  }

  // Weak columns: this split's share [j_lo, j_hi) of k, interleaved over the K slices. A row
  // whose slot is out of range, or a weak column index out of range, turns the row NaN.
  if (k > 0 && active) {
    const int j_lo = (int)((long long)split * k / nsplit);
    const int j_hi = (int)((long long)(split + 1) * k / nsplit);
    const f16* obase[MT];
#pragma unroll
    for (int m = 0; m < MT; ++m) {
      const long long sl = (slots != nullptr && row0 + m < M) ? slots[row0 + m] : 0;
      const f16* rows = slot_rows(oweight, table, sl, num_slots, k, out);
      obase[m] = rows == nullptr ? oweight : rows;
      const float start = rows == nullptr ? nan_value() : 0.0f;
#pragma unroll
      for (int c = 0; c < COLS; ++c) yacc[m][c] += start;
    }
    for (int j = j_lo + ty; j < j_hi; j += KSLICES) {
      const u32 col_in = (u32)__ldg(outlier_idx + j);
      const float poison = col_in < (u32)in ? 0.0f : nan_value();
      const u32 col = col_in < (u32)in ? col_in : 0u;
#pragma unroll
      for (int m = 0; m < MT; ++m) {
        if (row0 + m >= M) break;
        const float xv = Act::get(x[(u64)(row0 + m) * in + col]) + poison;
        float o[COLS];
        load4<Fp16, VEC>(obase[m] + (u64)j * out, c0, out, o);
#pragma unroll
        for (int c = 0; c < COLS; ++c) yacc[m][c] = fmaf(xv, o[c], yacc[m][c]);
      }
    }
  }

  // Reduce the K slices through shared memory (reusing the staging buffer).
  __syncthreads();
  if (ty > 0) {
#pragma unroll
    for (int m = 0; m < MT; ++m)
      *reinterpret_cast<float4*>(smem + ((ty - 1) * MT + m) * TILE_COLS + tx * COLS) =
          make_float4(yacc[m][0], yacc[m][1], yacc[m][2], yacc[m][3]);
  }
  __syncthreads();
  const int out_pad = (out + 3) & ~3;
  if (ty == 0 && active) {
#pragma unroll
    for (int sl = 1; sl < KSLICES; ++sl)
#pragma unroll
      for (int m = 0; m < MT; ++m) {
        const float4 r = *reinterpret_cast<const float4*>(smem + ((sl - 1) * MT + m) * TILE_COLS + tx * COLS);
        yacc[m][0] += r.x;
        yacc[m][1] += r.y;
        yacc[m][2] += r.z;
        yacc[m][3] += r.w;
      }
#pragma unroll
    for (int m = 0; m < MT; ++m) {
      if (row0 + m >= M) break;
      if (nsplit == 1) {
        store_row<VEC>(y, bias, (u64)(row0 + m) * out, c0, out, yacc[m]);
      } else {
        float* p = partial + ((u64)split * M + row0 + m) * out_pad + c0;
        *reinterpret_cast<float4*>(p) = make_float4(yacc[m][0], yacc[m][1], yacc[m][2], yacc[m][3]);
      }
    }
  }
  if (nsplit == 1) return;

  // Last block of this column tile and row chunk sums the partials in split order.
  __threadfence();
  __syncthreads();
  const int ticket = blockIdx.z * gridDim.x + blockIdx.x;
  if (tid == 0) is_last = atomicAdd(tickets + ticket, 1u) == (u32)(nsplit - 1);
  __syncthreads();
  if (!is_last) return;
  __threadfence();
  for (int e = tid; e < MT * TILE_THREADS; e += GEMV_THREADS) {
    const int m = e / TILE_THREADS, col = blockIdx.x * TILE_COLS + (e % TILE_THREADS) * COLS;
    if (row0 + m >= M || col >= out) continue;
    float v[COLS] = {0.0f, 0.0f, 0.0f, 0.0f};
    for (int sp = 0; sp < nsplit; ++sp) {
      const float4 r =
          __ldcg(reinterpret_cast<const float4*>(partial + ((u64)sp * M + row0 + m) * out_pad + col));
      v[0] += r.x;
      v[1] += r.y;
      v[2] += r.z;
      v[3] += r.w;
    }
    store_row<VEC>(y, bias, (u64)(row0 + m) * out, col, out, v);
  }
  if (tid == 0) tickets[ticket] = 0u;
}

// Dense weight [in, out] = (q - z) * s in the activation type, rounded once (bit-equal to
// packing.dequantize). grid (ceil(out / 512), 32-input blocks of this launch), block 128: one
// thread = 4 columns x one 32-input block; blk0 = first block (launches of at most 65535 rows).
template <int BITS, bool VEC>
__device__ __forceinline__ void dequant_body(const u32* __restrict__ qweight,
                                             const f16* __restrict__ scales,
                                             const u32* __restrict__ qzeros,
                                             act_t* __restrict__ w_out, int out, int group_blocks,
                                             int blk0) {
  const int c0 = (blockIdx.x * DEQ_THREADS + threadIdx.x) * COLS, blk = blk0 + blockIdx.y;
  if (c0 >= out) return;
  const int g = group_blocks > 0 ? blk / group_blocks : 0;
  u32 w[COLS][BITS];
  float s[COLS], z[COLS];
  load_words<BITS, VEC>(qweight, blk, out, c0, w);
  load_scale_zero<BITS, VEC>(scales, qzeros, g, out, c0, s, z);
#pragma unroll
  for (int j = 0; j < 32; ++j) {
    float v[COLS];
#pragma unroll
    for (int c = 0; c < COLS; ++c)
      v[c] = (decode_code<BITS>(w[c], j) * exp2_neg(code_shift(BITS, j)) - z[c]) * s[c];
    store_row<VEC>(w_out, nullptr, (u64)(blk * 32 + j) * out, c0, out, v);
  }
}

#define GEMV_PARAMS                                                                              \
  const act_t *x, const u32 *qweight, const f16 *scales, const u32 *qzeros,                   \
      const int *outlier_idx, const f16 *oweight, const f16 *table, const long long *slots,    \
      const f16 *bias, act_t *y, float *partial, u32 *tickets, int M, int in, int out, int k,  \
      int num_slots, int group_blocks, int bps
#define GEMV_ARGS                                                                               \
  x, qweight, scales, qzeros, outlier_idx, oweight, table, slots, bias, y, partial, tickets, M, \
      in, out, k, num_slots, group_blocks, bps

#define DEFINE_GEMV(BITS, MT, VEC, TAG)                                                     \
  extern "C" __global__ void __launch_bounds__(GEMV_THREADS)                                \
      dequant_gemv_##BITS##_##MT##_##TAG(GEMV_PARAMS) {                                     \
    gemv_body<BITS, MT, VEC>(GEMV_ARGS);                                                    \
  }

#define DEFINE_GEMV_ROWS(BITS, VEC, TAG) \
  DEFINE_GEMV(BITS, 1, VEC, TAG)         \
  DEFINE_GEMV(BITS, 2, VEC, TAG)         \
  DEFINE_GEMV(BITS, 4, VEC, TAG)         \
  DEFINE_GEMV(BITS, 8, VEC, TAG)

#define DEFINE_DEQUANT(BITS, VEC, TAG)                                                      \
  extern "C" __global__ void __launch_bounds__(DEQ_THREADS) dequantize_##BITS##_##TAG(      \
      const u32 *qweight, const f16 *scales, const u32 *qzeros, act_t *w_out, int out,      \
      int group_blocks, int blk0) {                                                         \
    dequant_body<BITS, VEC>(qweight, scales, qzeros, w_out, out, group_blocks, blk0);       \
  }

// Output widths that are not a multiple of 4 are rare: only 1 and 8 row variants for them.
#define DEFINE_ALL(BITS)              \
  DEFINE_GEMV_ROWS(BITS, true, vec)   \
  DEFINE_GEMV(BITS, 1, false, any)    \
  DEFINE_GEMV(BITS, 8, false, any)    \
  DEFINE_DEQUANT(BITS, true, vec)     \
  DEFINE_DEQUANT(BITS, false, any)

DEFINE_ALL(2)
DEFINE_ALL(3)
DEFINE_ALL(4)
