// The 16-bit GEMM of CPU fast steps: y [M, N] = x [M, K] @ ((q − z)·s)ᵀ for codes q in
// [0, 16) as the layer stores them (2, 3 or 4 bits), one zero point z and fp32 scale s per
// output and group. Activations are rounded to int16 with one scale per row (absmax / 32767),
// so each group's sum is exact in int32 (AVX-512 VNNI `vpdpwssd`, or AVX2 `vpmaddwd`: two int16
// products a lane; `cpu_gemm16.takes` keeps a group's sum inside int32), then scaled in fp32:
// f += float(Σ q·xq − z·Σ xq)·s_g over the groups, y = f·sx. A row's numbers depend on nothing
// but that row. Operands and twin: `cpu_gemm16.py` (`weight`, `twin`).
//
// Layout (`cpu_gemm16.pack`): uint8 [N/16, K/4, 32]; for 16 outputs and 4 inputs k..k+3,
// byte 2l + j holds output l's codes at k + j (low nibble) and k + 2 + j (high nibble), so one
// 32-byte load widened to int16 gives each lane its (k, k+1) pair in the low nibbles and its
// (k+2, k+3) pair in the high ones.
#include <torch/extension.h>

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <string>
#include <vector>

#if defined(__x86_64__) && defined(__GNUC__)
#include <cpuid.h>
#include <immintrin.h>
#define OWQ_X86 1
#define OWQ_VNNI __attribute__((target("avx512f,avx512bw,avx512vnni")))
#define OWQ_AVX2 __attribute__((target("avx2,fma")))
#define OWQ_AMX __attribute__((target("amx-tile,amx-int8,avx512f,avx512bw")))
#endif
#if defined(__linux__)
#include <sys/syscall.h>
#include <unistd.h>
#endif

namespace owq16 {

// AMX tiles with int8 products, and Linux's leave to use their state (asked once a process).
bool amx() {
#if defined(OWQ_X86) && defined(__linux__)
  unsigned a, b, c, d;
  if (!__get_cpuid_count(7, 0, &a, &b, &c, &d) || !(d & (1u << 24)) || !(d & (1u << 25)))
    return false;
  return syscall(SYS_arch_prctl, 0x1023 /* ARCH_REQ_XCOMP_PERM */, 18 /* XTILEDATA */) == 0;
#else
  return false;
#endif
}

// The widest form this CPU runs: 3 AMX (`tdpbssd`/`tdpbusd`, for steps of several rows; lone
// rows take the VNNI form), 2 AVX-512 VNNI (`vpdpwssd`), 1 AVX2 (`vpmaddwd`), 0 none.
// `OWQ_CPU_GEMM=avx2` or `vnni` caps it. Every form gives the same integer sums and the same
// fp32 epilogue, so the same bits. Asked once: `mm` checks it on every call.
int level() {
#ifdef OWQ_X86
  static const int best = [] {
    __builtin_cpu_init();
    const bool vnni = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                      __builtin_cpu_supports("avx512vnni");
    const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
    const char* env = std::getenv("OWQ_CPU_GEMM");
    const std::string cap = env == nullptr ? "" : env;
    if (cap == "avx2") return avx2 ? 1 : 0;
    if (!vnni) return avx2 ? 1 : 0;
    return cap != "vnni" && amx() ? 3 : 2;
  }();
  return best;
#else
  return 0;
#endif
}

bool supported() { return level() > 0; }

#ifdef OWQ_X86
// R rows × 16 outputs over all K; U independent int32 accumulators a row (a lone row's chain of
// dependent `vpdpwssd` would otherwise wait on their latency), summed per group.
template <int R, int U>
OWQ_VNNI void tile(const uint8_t* w, const int16_t* xq, int64_t k, int64_t groups,
                   const float* scale, const uint8_t* zero, int64_t n, const float* sx,
                   const int32_t* sums, float* y) {
  const __m512i nibble = _mm512_set1_epi16(0x000F);
  const int64_t steps = k / 4 / groups;  // 4 inputs a step
  __m512 f[R];
  for (int r = 0; r < R; ++r) f[r] = _mm512_setzero_ps();
  for (int64_t g = 0; g < groups; ++g) {
    __m512i a[R][U];
    for (int r = 0; r < R; ++r)
      for (int u = 0; u < U; ++u) a[r][u] = _mm512_setzero_si512();
    for (int64_t t = g * steps; t < (g + 1) * steps; t += U) {
      for (int u = 0; u < U && t + u < (g + 1) * steps; ++u) {
        const __m256i bytes =
            _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + (t + u) * 32));
        const __m512i v = _mm512_cvtepu8_epi16(bytes);
        const __m512i lo = _mm512_and_si512(v, nibble);
        const __m512i hi = _mm512_and_si512(_mm512_srli_epi16(v, 4), nibble);
        for (int r = 0; r < R; ++r) {
          const int32_t* x2 = reinterpret_cast<const int32_t*>(xq + r * k + 4 * (t + u));
          a[r][u] = _mm512_dpwssd_epi32(a[r][u], lo, _mm512_set1_epi32(x2[0]));
          a[r][u] = _mm512_dpwssd_epi32(a[r][u], hi, _mm512_set1_epi32(x2[1]));
        }
      }
    }
    const __m512 s = _mm512_loadu_ps(scale + g * n);
    const __m512i z =
        _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(zero + g * n)));
    for (int r = 0; r < R; ++r) {
      __m512i c = a[r][0];
      for (int u = 1; u < U; ++u) c = _mm512_add_epi32(c, a[r][u]);
      c = _mm512_sub_epi32(c, _mm512_mullo_epi32(z, _mm512_set1_epi32(sums[r * groups + g])));
      f[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(c), s, f[r]);
    }
  }
  for (int r = 0; r < R; ++r)
    _mm512_storeu_ps(y + r * n, _mm512_mul_ps(f[r], _mm512_set1_ps(sx[r])));
}

// The AVX2 form of `tile`: each 16-byte half of a step's 32 bytes is 8 outputs' pairs, widened
// to 16 int16 and multiplied with `vpmaddwd` (two int16 products summed a lane, exact in int32),
// so the integer sums, and then every fp32 operation, are those of `tile`.
template <int R, int U>
OWQ_AVX2 void tile2(const uint8_t* w, const int16_t* xq, int64_t k, int64_t groups,
                    const float* scale, const uint8_t* zero, int64_t n, const float* sx,
                    const int32_t* sums, float* y) {
  const __m256i nibble = _mm256_set1_epi16(0x000F);
  const int64_t steps = k / 4 / groups;
  __m256 f[R][2];
  for (int r = 0; r < R; ++r) f[r][0] = f[r][1] = _mm256_setzero_ps();
  for (int64_t g = 0; g < groups; ++g) {
    __m256i a[R][U][2];
    for (int r = 0; r < R; ++r)
      for (int u = 0; u < U; ++u) a[r][u][0] = a[r][u][1] = _mm256_setzero_si256();
    for (int64_t t = g * steps; t < (g + 1) * steps; t += U) {
      for (int u = 0; u < U && t + u < (g + 1) * steps; ++u) {
        __m256i lo[2], hi[2];
        for (int h = 0; h < 2; ++h) {
          const __m128i bytes =
              _mm_loadu_si128(reinterpret_cast<const __m128i*>(w + (t + u) * 32 + 16 * h));
          const __m256i v = _mm256_cvtepu8_epi16(bytes);
          lo[h] = _mm256_and_si256(v, nibble);
          hi[h] = _mm256_and_si256(_mm256_srli_epi16(v, 4), nibble);
        }
        for (int r = 0; r < R; ++r) {
          const int32_t* x2 = reinterpret_cast<const int32_t*>(xq + r * k + 4 * (t + u));
          const __m256i b0 = _mm256_set1_epi32(x2[0]), b1 = _mm256_set1_epi32(x2[1]);
          for (int h = 0; h < 2; ++h) {
            const __m256i p = _mm256_add_epi32(_mm256_madd_epi16(lo[h], b0),
                                               _mm256_madd_epi16(hi[h], b1));
            a[r][u][h] = _mm256_add_epi32(a[r][u][h], p);
          }
        }
      }
    }
    for (int h = 0; h < 2; ++h) {
      const __m256 s = _mm256_loadu_ps(scale + g * n + 8 * h);
      const __m256i z = _mm256_cvtepu8_epi32(
          _mm_loadl_epi64(reinterpret_cast<const __m128i*>(zero + g * n + 8 * h)));
      for (int r = 0; r < R; ++r) {
        __m256i c = a[r][0][h];
        for (int u = 1; u < U; ++u) c = _mm256_add_epi32(c, a[r][u][h]);
        c = _mm256_sub_epi32(c, _mm256_mullo_epi32(z, _mm256_set1_epi32(sums[r * groups + g])));
        f[r][h] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(c), s, f[r][h]);
      }
    }
  }
  for (int r = 0; r < R; ++r)
    for (int h = 0; h < 2; ++h)
      _mm256_storeu_ps(y + r * n + 8 * h, _mm256_mul_ps(f[r][h], _mm256_set1_ps(sx[r])));
}

using Tile = void (*)(const uint8_t*, const int16_t*, int64_t, int64_t, const float*,
                      const uint8_t*, int64_t, const float*, const int32_t*, float*);
constexpr Tile kTiles[8] = {tile<1, 4>, tile<2, 4>, tile<3, 2>, tile<4, 2>,
                            tile<5, 1>, tile<6, 1>, tile<7, 1>, tile<8, 1>};
constexpr Tile kTiles2[4] = {tile2<1, 2>, tile2<2, 2>, tile2<3, 1>, tile2<4, 1>};

// The AMX form, for 16 outputs and up to 16 rows (A tiles of 16 rows; rows past m are zeros).
// Each int16 input is 256·hi + lo (hi = xq >> 8 signed, lo = xq & 255 unsigned), so Σ q·xq =
// 256·Σ q·hi (`tdpbssd`) + Σ q·lo (`tdpbusd`), exact in int32 as the other forms' sums; the
// codes of kt inputs are widened into a B tile (a row per 4 inputs: each output's 4 codes).
// Tiles: 0, 1 the two sums; 2, 3 the inputs' hi and lo bytes; 4 the codes.
struct alignas(64) TileConfig {
  uint8_t palette = 1, start = 0, reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

OWQ_AMX void amx_tile(const uint8_t* w, const int8_t* hi, const uint8_t* lo, int64_t k,
                      int64_t kt, int64_t groups, const float* scale, const uint8_t* zero,
                      int64_t n, const float* sx, const int32_t* sums, float* y, int64_t rows) {
  alignas(64) uint8_t b[16 * 64];
  alignas(64) int32_t ch[16 * 16], cl[16 * 16];
  __m512 f[16];
  for (int r = 0; r < 16; ++r) f[r] = _mm512_setzero_ps();
  const __m256i nibble = _mm256_set1_epi8(0x0F);
  const int64_t per = k / groups;
  for (int64_t g = 0; g < groups; ++g) {
    _tile_zero(0);
    _tile_zero(1);
    for (int64_t k0 = g * per; k0 < (g + 1) * per; k0 += kt) {
      for (int64_t t = 0; t < kt / 4; ++t) {  // B row t: outputs' codes at k0 + 4t .. + 3
        const uint8_t* chunk = w + (k0 / 4 + t) * 32;
        const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(chunk));
        const __m256i low = _mm256_and_si256(v, nibble);
        const __m256i high = _mm256_and_si256(_mm256_srli_epi16(v, 4), nibble);
        const __m512i row = _mm512_or_si512(_mm512_cvtepu16_epi32(low),
                                            _mm512_slli_epi32(_mm512_cvtepu16_epi32(high), 16));
        _mm512_store_si512(reinterpret_cast<__m512i*>(b + t * 64), row);
      }
      _tile_loadd(4, b, 64);
      _tile_loadd(2, hi + k0, k);
      _tile_loadd(3, lo + k0, k);
      _tile_dpbssd(0, 2, 4);
      _tile_dpbusd(1, 3, 4);
    }
    _tile_stored(0, ch, 64);
    _tile_stored(1, cl, 64);
    const __m512 s = _mm512_loadu_ps(scale + g * n);
    const __m512i z =
        _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(zero + g * n)));
    for (int64_t r = 0; r < rows; ++r) {
      __m512i c = _mm512_add_epi32(_mm512_slli_epi32(_mm512_load_si512(ch + 16 * r), 8),
                                   _mm512_load_si512(cl + 16 * r));
      c = _mm512_sub_epi32(c, _mm512_mullo_epi32(z, _mm512_set1_epi32(sums[r * groups + g])));
      f[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(c), s, f[r]);
    }
  }
  for (int64_t r = 0; r < rows; ++r)
    _mm512_storeu_ps(y + r * n, _mm512_mul_ps(f[r], _mm512_set1_ps(sx[r])));
}

OWQ_AMX void amx_begin(int64_t kt) {
  TileConfig cfg;
  for (int t = 0; t < 5; ++t) cfg.rows[t] = 16;
  cfg.colsb[0] = cfg.colsb[1] = cfg.colsb[4] = 64;
  cfg.colsb[2] = cfg.colsb[3] = static_cast<uint16_t>(kt);
  cfg.rows[4] = static_cast<uint8_t>(kt / 4);
  asm volatile("" : : "r"(&cfg) : "memory");  // GCC 12 drops the stores `ldtilecfg` reads
  _tile_loadconfig(&cfg);
}

OWQ_AMX void amx_end() { _tile_release(); }

constexpr int64_t kAmxRows = 5;  // fewer rows take the VNNI form (measured: a tile's fixed cost)
#endif

// x fp32 [M, K], w uint8 [N/16, K/4, 32], scales fp32 [groups, N], zeros uint8 [groups, N]
// -> y fp32 [M, N].
at::Tensor mm(const at::Tensor& x_, const at::Tensor& w, const at::Tensor& scales,
              const at::Tensor& zeros, int64_t form) {
  TORCH_CHECK(x_.dim() == 2 && x_.scalar_type() == at::kFloat, "x: fp32 [M, K]");
  const int64_t m = x_.size(0), k = x_.size(1), blocks = w.size(0), n = blocks * 16;
  const int64_t groups = scales.size(0);
  TORCH_CHECK(w.dim() == 3 && w.size(1) * 4 == k && w.size(2) == 32 && w.is_contiguous() &&
                  w.scalar_type() == at::kByte,
              "codes: uint8 [N/16, K/4, 32]");
  TORCH_CHECK(scales.dim() == 2 && scales.size(1) == n && scales.scalar_type() == at::kFloat &&
                  scales.is_contiguous() && k % (4 * groups) == 0,
              "scales: fp32 [groups, N], groups of a multiple of 4 inputs");
  TORCH_CHECK(zeros.sizes() == scales.sizes() && zeros.scalar_type() == at::kByte &&
                  zeros.is_contiguous(),
              "zeros: uint8 [groups, N]");
  // form: 0 the widest this CPU runs (`level`), else at most that one (the tests hold every
  // form to the twin)
  const int use = form == 0 ? level() : std::min<int>(static_cast<int>(form), level());
  TORCH_CHECK(use > 0, "the 16-bit GEMM needs AVX2 and FMA");
  at::Tensor x = x_.contiguous();
  const float* xp = x.data_ptr<float>();
  std::vector<int16_t> xq(m * k);
  std::vector<float> sx(m);
  std::vector<int32_t> sums(m * groups);
  const int64_t per = k / groups;
#ifdef OWQ_X86
  const bool on_amx = use == 3 && m >= kAmxRows;
#else
  const bool on_amx = false;
#endif
  // the AMX form reads each input as a signed high and an unsigned low byte, in A tiles of 16
  // rows (rows past m stay zero)
  std::vector<int8_t> hi(on_amx ? (m + 15) / 16 * 16 * k : 0, 0);
  std::vector<uint8_t> lo(hi.size(), 0);
  at::parallel_for(0, m, 16, [&](int64_t r0, int64_t r1) {  // each row alone: any split
    for (int64_t r = r0; r < r1; ++r) {
      const float* row = xp + r * k;
      float top = 0.f;
      bool finite = true;
      for (int64_t i = 0; i < k; ++i) {
        top = std::max(top, std::fabs(row[i]));
        finite = finite && std::isfinite(row[i]);
      }
      const float inv = finite && top > 0.f ? 32767.f / top : 0.f;
      sx[r] = finite ? top / 32767.f : NAN;  // a row with an inf or a NaN comes out NaN, whole
      for (int64_t g = 0; g < groups; ++g) {
        int32_t sum = 0;
        for (int64_t i = g * per; i < (g + 1) * per; ++i) {
          const int16_t q = static_cast<int16_t>(std::nearbyint(row[i] * inv));
          xq[r * k + i] = q;
          sum += q;
          if (on_amx) {
            hi[r * k + i] = static_cast<int8_t>(q >> 8);
            lo[r * k + i] = static_cast<uint8_t>(q & 0xFF);
          }
        }
        sums[r * groups + g] = sum;
      }
    }
  });
  at::Tensor y = at::empty({m, n}, x.options());
#ifdef OWQ_X86
  float* yp = y.data_ptr<float>();
  const uint8_t* wp = w.data_ptr<uint8_t>();
  const float* sp = scales.data_ptr<float>();
  const uint8_t* zp = zeros.data_ptr<uint8_t>();
  if (on_amx) {
    const int64_t kt = per % 64 == 0 ? 64 : 32;  // inputs a B tile spans
    at::parallel_for(0, blocks, 1, [&](int64_t b0, int64_t b1) {
      amx_begin(kt);
      for (int64_t b = b0; b < b1; ++b) {
        for (int64_t r0 = 0; r0 < m; r0 += 16) {
          amx_tile(wp + b * (k / 4) * 32, hi.data() + r0 * k, lo.data() + r0 * k, k, kt, groups,
                   sp + b * 16, zp + b * 16, n, sx.data() + r0, sums.data() + r0 * groups,
                   yp + r0 * n + b * 16, std::min<int64_t>(16, m - r0));
        }
      }
      amx_end();
    });
    return y;
  }
  const int64_t height = use >= 2 ? 8 : 4;  // rows a tile
  const Tile* tiles = use >= 2 ? kTiles : kTiles2;
  at::parallel_for(0, blocks, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      for (int64_t r0 = 0; r0 < m; r0 += height) {
        const int64_t rows = std::min<int64_t>(height, m - r0);
        tiles[rows - 1](wp + b * (k / 4) * 32, xq.data() + r0 * k, k, groups, sp + b * 16,
                        zp + b * 16, n, sx.data() + r0, sums.data() + r0 * groups,
                        yp + r0 * n + b * 16);
      }
    }
  });
#endif
  return y;
}

}  // namespace owq16
