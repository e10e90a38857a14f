// Per-row-slot weak-column product (SGMV-like) for the batched path, in ONE launch:
//   y[b, :] (+)= x[b, idx] @ O[slot[b]] (+ bias), O[0] = oweight [k, out], O[s] = table[s-1].
// Compiled by CuPy RawModule (NVRTC) and by tests/test_cuda_compile.py (nvcc) with the same
// options; no headers. Knows nothing of the packed format, torch or models.
//
// weak_columns_sgmv_<TAG>: grid (ceil(out / 512), ceil(M / 8)), block 128. A thread owns 4
// consecutive output columns of 8 rows; the gathered x[b, idx[j]] of those rows are staged in
// shared memory 128 weak columns at a time; every row reads its own slot's rows of O (rows that
// share a slot hit the same cache lines). fp32 accumulation, one fp16 rounding at the end.

#define SG_THREADS 128
#define SG_COLS 4
#define SG_ROWS 8
#define SG_JCHUNK 128

typedef unsigned int u32;
typedef unsigned short f16;
typedef unsigned long long u64;  // no <cstddef> under NVRTC

__device__ __forceinline__ float sg_h2f(f16 h) {
  float f;
  asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h));
  return f;
}

__device__ __forceinline__ f16 sg_f2h(float f) {
  f16 h;
  asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(f));
  return h;
}

// Four fp16 values p[c0..c0+3] as floats (0 past `out`).
template <bool VEC>
__device__ __forceinline__ void sg_load4(const f16* __restrict__ p, int c0, int out,
                                         float (&v)[SG_COLS]) {
  if (VEC) {
    const uint2 h = __ldg(reinterpret_cast<const uint2*>(p + c0));
    v[0] = sg_h2f((f16)(h.x & 0xFFFFu));
    v[1] = sg_h2f((f16)(h.x >> 16));
    v[2] = sg_h2f((f16)(h.y & 0xFFFFu));
    v[3] = sg_h2f((f16)(h.y >> 16));
  } else {
#pragma unroll
    for (int c = 0; c < SG_COLS; ++c) v[c] = c0 + c < out ? sg_h2f(__ldg(p + c0 + c)) : 0.0f;
  }
}

template <bool VEC>
__device__ __forceinline__ void sgmv_body(const f16* __restrict__ x,
                                          const int* __restrict__ outlier_idx,
                                          const f16* __restrict__ oweight,
                                          const f16* __restrict__ table,
                                          const long long* __restrict__ slots,
                                          const f16* __restrict__ bias, f16* __restrict__ y, int M,
                                          int in, int out, int k, int num_slots, int accumulate) {
  __shared__ float xk[SG_ROWS][SG_JCHUNK];  // gathered x[row0 + r, idx[j0 + j]]
  const int tx = threadIdx.x, row0 = blockIdx.y * SG_ROWS;
  const int c0 = (blockIdx.x * SG_THREADS + tx) * SG_COLS;
  const int rows = min(SG_ROWS, M - row0);

  const f16* obase[SG_ROWS];
#pragma unroll
  for (int r = 0; r < SG_ROWS; ++r) {
    long long sl = (slots != nullptr && r < rows) ? slots[row0 + r] : 0;
    sl = sl < 0 ? 0 : (sl > num_slots ? num_slots : sl);
    obase[r] = sl == 0 ? oweight : table + (u64)(sl - 1) * k * out;
  }
  float acc[SG_ROWS][SG_COLS];
#pragma unroll
  for (int r = 0; r < SG_ROWS; ++r)
#pragma unroll
    for (int c = 0; c < SG_COLS; ++c) acc[r][c] = 0.0f;

  for (int j0 = 0; j0 < k; j0 += SG_JCHUNK) {
    const int jn = min(SG_JCHUNK, k - j0);
    __syncthreads();
    for (int e = tx; e < SG_ROWS * SG_JCHUNK; e += SG_THREADS) {
      const int r = e / SG_JCHUNK, j = e % SG_JCHUNK;
      xk[r][j] = (r < rows && j < jn) ? sg_h2f(x[(u64)(row0 + r) * in + outlier_idx[j0 + j]])
                                      : 0.0f;
    }
    __syncthreads();
    if (c0 >= out) continue;
    for (int j = 0; j < jn; ++j) {
#pragma unroll
      for (int r = 0; r < SG_ROWS; ++r) {
        if (r >= rows) break;
        float o[SG_COLS];
        sg_load4<VEC>(obase[r] + (u64)(j0 + j) * out, c0, out, o);
        const float xv = xk[r][j];
#pragma unroll
        for (int c = 0; c < SG_COLS; ++c) acc[r][c] = fmaf(xv, o[c], acc[r][c]);
      }
    }
  }
  if (c0 >= out) return;

  float b[SG_COLS] = {0.0f, 0.0f, 0.0f, 0.0f};
  if (bias != nullptr) sg_load4<VEC>(bias, c0, out, b);
#pragma unroll
  for (int r = 0; r < SG_ROWS; ++r) {
    if (r >= rows) break;
    f16* yr = y + (u64)(row0 + r) * out;
    float prev[SG_COLS] = {0.0f, 0.0f, 0.0f, 0.0f};
    if (accumulate) sg_load4<VEC>(yr, c0, out, prev);
#pragma unroll
    for (int c = 0; c < SG_COLS; ++c)
      if (c0 + c < out) yr[c0 + c] = sg_f2h(prev[c] + acc[r][c] + b[c]);
  }
}

#define DEFINE_SGMV(VEC, TAG)                                                                   \
  extern "C" __global__ void __launch_bounds__(SG_THREADS) weak_columns_sgmv_##TAG(             \
      const f16 *x, const int *outlier_idx, const f16 *oweight, const f16 *table,               \
      const long long *slots, const f16 *bias, f16 *y, int M, int in, int out, int k,           \
      int num_slots, int accumulate) {                                                          \
    sgmv_body<VEC>(x, outlier_idx, oweight, table, slots, bias, y, M, in, out, k, num_slots,    \
                   accumulate);                                                                 \
  }

DEFINE_SGMV(true, vec)
DEFINE_SGMV(false, any)
