// Per-row-slot weak-column product (SGMV-like) for the batched path, in ONE launch:
//   y[b, :] (+)= x[b, idx] @ O[slot[b]] (+ bias), O[0] = oweight [k, out], O[s] = table[s-1].
// Compiled by CuPy RawModule (NVRTC) and by the compile checks with the same options
// (cuda_build.COMPILE_OPTIONS: -I finds owq_cuda.cuh). x and y are the module's activation type
// (fp16, or bf16 under -DOWQ_ACT_BF16). Knows nothing of the packed format, torch or models.
//
// weak_columns_sgmv_<TAG>: grid (ceil(out / 512), ceil(M / 8)), block 128. A thread owns 4
// consecutive output columns of 8 rows; the gathered x[b, idx[j]] of those rows are staged in
// shared memory 128 weak columns at a time; every row reads its own slot's rows of O (rows that
// share a slot hit the same cache lines). fp32 accumulation, one rounding at the end. y is read
// (accumulate) with plain loads: the launch writes it, so it is not read-only data. A slot id
// outside [0, num_slots] or a weak column index outside [0, in) makes its row NaN.

#include "owq_cuda.cuh"

#define SG_THREADS 128
#define SG_ROWS 8
#define SG_JCHUNK 128

template <bool VEC>
__device__ __forceinline__ void sgmv_body(const act_t* __restrict__ x,
                                          const int* __restrict__ outlier_idx,
                                          const f16* __restrict__ oweight,
                                          const f16* __restrict__ table,
                                          const long long* __restrict__ slots,
                                          const f16* __restrict__ bias, act_t* y, int M, int in,
                                          int out, int k, int num_slots, int accumulate) {
  __shared__ float xk[SG_ROWS][SG_JCHUNK];  // gathered x[row0 + r, idx[j0 + j]]
  const int tx = threadIdx.x, row0 = blockIdx.y * SG_ROWS;
  const int c0 = (blockIdx.x * SG_THREADS + tx) * COLS;
  const int rows = min(SG_ROWS, M - row0);

  float acc[SG_ROWS][COLS];
  const f16* obase[SG_ROWS];
#pragma unroll
  for (int r = 0; r < SG_ROWS; ++r) {
    const long long sl = (slots != nullptr && r < rows) ? slots[row0 + r] : 0;
    obase[r] = slot_rows(oweight, table, sl, num_slots, k, out);
    const float start = obase[r] == nullptr && k > 0 ? nan_value() : 0.0f;
    if (obase[r] == nullptr) obase[r] = oweight;
#pragma unroll
    for (int c = 0; c < COLS; ++c) acc[r][c] = start;
  }

  for (int j0 = 0; j0 < k; j0 += SG_JCHUNK) {
    const int jn = min(SG_JCHUNK, k - j0);
    __syncthreads();
    for (int e = tx; e < SG_ROWS * SG_JCHUNK; e += SG_THREADS) {
      const int r = e / SG_JCHUNK, j = e % SG_JCHUNK;
      float v = 0.0f;
      if (r < rows && j < jn) {
        const int col_in = outlier_idx[j0 + j];
        v = (u32)col_in < (u32)in ? Act::get(x[(u64)(row0 + r) * in + col_in]) : nan_value();
      }
      xk[r][j] = v;
    }
    __syncthreads();
    if (c0 >= out) continue;
    for (int j = 0; j < jn; ++j) {
#pragma unroll
      for (int r = 0; r < SG_ROWS; ++r) {
        if (r >= rows) break;
        float o[COLS];
        load4<Fp16, VEC>(obase[r] + (u64)(j0 + j) * out, c0, out, o);
        const float xv = xk[r][j];
#pragma unroll
        for (int c = 0; c < COLS; ++c) acc[r][c] = fmaf(xv, o[c], acc[r][c]);
      }
    }
  }
  if (c0 >= out) return;

  float b[COLS] = {0.0f, 0.0f, 0.0f, 0.0f};
  if (bias != nullptr) load4<Fp16, VEC>(bias, c0, out, b);
#pragma unroll
  for (int r = 0; r < SG_ROWS; ++r) {
    if (r >= rows) break;
    act_t* yr = y + (u64)(row0 + r) * out;
    float v[COLS] = {0.0f, 0.0f, 0.0f, 0.0f};
    if (accumulate) load4<Act, VEC, COHERENT>(yr, c0, out, v);
#pragma unroll
    for (int c = 0; c < COLS; ++c) v[c] += acc[r][c] + b[c];
    store4<Act, VEC>(yr, c0, out, v);
  }
}

#define DEFINE_SGMV(VEC, TAG)                                                                   \
  extern "C" __global__ void __launch_bounds__(SG_THREADS) weak_columns_sgmv_##TAG(             \
      const act_t *x, const int *outlier_idx, const f16 *oweight, const f16 *table,             \
      const long long *slots, const f16 *bias, act_t *y, int M, int in, int out, int k,         \
      int num_slots, int accumulate) {                                                          \
    sgmv_body<VEC>(x, outlier_idx, oweight, table, slots, bias, y, M, in, out, k, num_slots,    \
                   accumulate);                                                                 \
  }

DEFINE_SGMV(true, vec)
DEFINE_SGMV(false, any)
