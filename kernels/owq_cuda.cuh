// Shared device code of owq's kernels (dequant_gemv.cu, weak_sgmv.cu): raw 16-bit float
// conversions, the activation type of the module, and the 4-column loads and stores.
//
// Included as "owq_cuda.cuh" and found through -I<kernels dir>, the option CuPy's RawModule
// (NVRTC) and the compile checks are given (cuda_build.COMPILE_OPTIONS). No system headers
// (NVRTC has none): conversions are PTX cvt (bf16 rounding needs sm_80), bf16 widening a shift.
// Activations (x, y, dequantized weights) are fp16, or bf16 when the module is compiled with
// -DOWQ_ACT_BF16; scales, bias and weak columns are always fp16; every sum is fp32.
// Knows nothing of the packed format, torch or models.
#ifndef OWQ_CUDA_CUH
#define OWQ_CUDA_CUH

#define COLS 4  // consecutive output columns owned by one thread, in every kernel

typedef unsigned int u32;
typedef unsigned short u16;
typedef unsigned long long u64;  // no <cstddef> under NVRTC
typedef u16 f16;                 // raw IEEE half bits
typedef u16 act_t;               // raw bits of the activation type (fp16 or bf16)

__device__ __forceinline__ float h2f(f16 h) {
  float f;
  asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h));
  return f;
}

__device__ __forceinline__ f16 f2h(float f) {
  f16 h;
  asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(f));
  return h;
}

// A quiet NaN: what a row gets from a slot id or weak column index out of range.
__device__ __forceinline__ float nan_value() { return __uint_as_float(0x7FC00000u); }

// fp16 values (scales, bias, weak columns).
struct Fp16 {
  __device__ __forceinline__ static float get(u16 v) { return h2f(v); }
  __device__ __forceinline__ static u16 put(float f) { return f2h(f); }
};

// Activation values.
struct Act {
#ifdef OWQ_ACT_BF16
  __device__ __forceinline__ static float get(u16 v) { return __uint_as_float((u32)v << 16); }
  __device__ __forceinline__ static u16 put(float f) {  // sm_80 and later
    u16 h;
    asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(h) : "f"(f));
    return h;
  }
#else
  __device__ __forceinline__ static float get(u16 v) { return h2f(v); }
  __device__ __forceinline__ static u16 put(float f) { return f2h(f); }
#endif
};

// READ_ONLY: data no thread of the launch writes (__ldg, the read-only path).
// COHERENT: data the launch also writes (a plain load; __ldg would be outside its contract).
enum Load { READ_ONLY, COHERENT };

template <Load L, class T>
__device__ __forceinline__ T load(const T* p) {
  if (L == READ_ONLY) return __ldg(p);
  return *p;
}

// Four 16-bit values p[c0..c0+3] of a row of length `out` as floats (0 past the end). VEC: one
// 8-byte load (p + c0 8-byte aligned, out % 4 == 0).
template <class F, bool VEC, Load L = READ_ONLY>
__device__ __forceinline__ void load4(const u16* p, int c0, int out, float (&v)[COLS]) {
  if (VEC) {
    const uint2 h = load<L>(reinterpret_cast<const uint2*>(p + c0));
    v[0] = F::get((u16)(h.x & 0xFFFFu));
    v[1] = F::get((u16)(h.x >> 16));
    v[2] = F::get((u16)(h.y & 0xFFFFu));
    v[3] = F::get((u16)(h.y >> 16));
  } else {
#pragma unroll
    for (int c = 0; c < COLS; ++c) v[c] = c0 + c < out ? F::get(load<L>(p + c0 + c)) : 0.0f;
  }
}

// p[c0..c0+3] = v rounded once (nothing past `out`).
template <class F, bool VEC>
__device__ __forceinline__ void store4(u16* p, int c0, int out, const float (&v)[COLS]) {
  if (VEC) {
    uint2 h;
    h.x = (u32)F::put(v[0]) | ((u32)F::put(v[1]) << 16);
    h.y = (u32)F::put(v[2]) | ((u32)F::put(v[3]) << 16);
    *reinterpret_cast<uint2*>(p + c0) = h;
  } else {
#pragma unroll
    for (int c = 0; c < COLS; ++c)
      if (c0 + c < out) p[c0 + c] = F::put(v[c]);
  }
}

// Start of the weak-column rows [k, out] of slot `slot` (0 = oweight, s >= 1 = table[s - 1]),
// or nullptr when the slot is outside [0, num_slots]: the caller then makes the row NaN.
__device__ __forceinline__ const f16* slot_rows(const f16* oweight, const f16* table,
                                                long long slot, int num_slots, int k, int out) {
  if (slot < 0 || slot > num_slots) return nullptr;
  return slot == 0 ? oweight : table + (u64)(slot - 1) * k * out;
}

#endif  // OWQ_CUDA_CUH
