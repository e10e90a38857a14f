// Fused CPU steps of a stack of pre-norm decoder blocks (RMSNorm, optional per-head q/k
// RMSNorm (Qwen3), RoPE, grouped-query attention over the KV cache, gated SiLU MLP), one token
// per row, every projection on the low-bit kernel its CPU plan chose (the 16-bit GEMM of
// `cpu_gemm16.cpp` on x86 CPUs with AVX2, torch's 4-bit kernel elsewhere) plus its weak
// columns. Built by `cpu_build.py`, driven by `cpu_decode.py`; twin: the runtime's eager block
// (`server/runtime/llama.py`, on the same kernels), which this file must match to fp32
// rounding. One call per step instead of ~60 eager ops per block: what remains of a step is
// the low-bit GEMMs and the bytes they read.
//
// A row is one token at its own position in its own cache row: a decode step's rows are one
// token of each sequence; a prompt's tokens are rows that share a cache row, each at its
// position. Every key and value is written before any row attends, so a prompt token sees the
// tokens before it (causal). Every row is computed on its own (norms, RoPE, its weak columns
// from its own slot, attention over its own positions), so a row's numbers do not depend on
// which other rows share the step.
#include <torch/extension.h>

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <vector>

#if defined(__F16C__) && defined(__FMA__)
#include <immintrin.h>
#define OWQ_F16C 1
#endif

namespace owq16 {  // cpu_gemm16.cpp
bool supported();
int level();
at::Tensor mm(const at::Tensor& x, const at::Tensor& w, const at::Tensor& scales,
              const at::Tensor& zeros, int64_t form);
}  // namespace owq16

namespace {

struct Linear {
  at::Tensor packed, scale_zero;          // torch's 4-bit kernel's operands, or empty
  at::Tensor codes16, scales16, zeros16;  // the 16-bit GEMM's (`cpu_gemm16.cpp`), or empty
  at::Tensor correction;                  // fp32 [groups, out] zero term of 4-bit codes, or empty
  at::Tensor idx;                         // long [k] weak inputs, or empty
  at::Tensor bias;                        // fp32 [out], or empty
  at::Tensor spans;  // long [R, 3]: (weak row j, first output, outputs) it covers
  int64_t group = 0, group_size = 0, out = 0;
};

struct Block {
  Linear qkv, o, gate_up, down;
  at::Tensor attn_norm, mlp_norm;  // fp32 [E]
  at::Tensor q_norm, k_norm;       // fp32 [D] per-head norms of q and k before RoPE, or empty
};

bool given(const at::Tensor& t) { return t.defined() && t.numel() > 0; }

// acc[0:n] += a * row[0:n], row fp16 or fp32.
void axpy(float* acc, const at::Half* row, float a, int64_t n) {
  int64_t i = 0;
#ifdef OWQ_F16C
  const __m256 va = _mm256_set1_ps(a);
  for (; i + 8 <= n; i += 8) {
    __m256 r = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(row + i)));
    _mm256_storeu_ps(acc + i, _mm256_fmadd_ps(va, r, _mm256_loadu_ps(acc + i)));
  }
#endif
  for (; i < n; ++i) acc[i] += a * static_cast<float>(row[i]);
}

void axpy(float* acc, const float* row, float a, int64_t n) {
  for (int64_t i = 0; i < n; ++i) acc[i] += a * row[i];
}

// acc[0:n] += a[0]·rows[0][0:n] + ... + a[m-1]·rows[m-1][0:n], m <= 4, each element summed in
// that order as m calls of `axpy` would (the same bits), but acc read and written once.
void axpy_rows(float* acc, const at::Half* const* rows, const float* a, int64_t m, int64_t n) {
  int64_t i = 0;
#ifdef OWQ_F16C
  if (m == 4) {
    const __m256 a0 = _mm256_set1_ps(a[0]), a1 = _mm256_set1_ps(a[1]);
    const __m256 a2 = _mm256_set1_ps(a[2]), a3 = _mm256_set1_ps(a[3]);
    for (; i + 8 <= n; i += 8) {
      __m256 s = _mm256_loadu_ps(acc + i);
      s = _mm256_fmadd_ps(a0, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)(rows[0] + i))), s);
      s = _mm256_fmadd_ps(a1, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)(rows[1] + i))), s);
      s = _mm256_fmadd_ps(a2, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)(rows[2] + i))), s);
      s = _mm256_fmadd_ps(a3, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)(rows[3] + i))), s);
      _mm256_storeu_ps(acc + i, s);
    }
  }
#endif
  for (int64_t r = 0; r < m; ++r) axpy(acc + i, rows[r] + i, a[r], n - i);
}

void axpy_rows(float* acc, const float* const* rows, const float* a, int64_t m, int64_t n) {
  for (int64_t r = 0; r < m; ++r) axpy(acc, rows[r], a[r], n);
}

float dot(const float* a, const float* b, int64_t n) {
  float s = 0.f;
#pragma omp simd reduction(+ : s)
  for (int64_t i = 0; i < n; ++i) s += a[i] * b[i];
  return s;
}

// The dense part of x [B, in] -> [B, out] fp32, as `cpu_ops._int4` (or on the 16-bit GEMM
// where the layer has its operands), plus the bias.
at::Tensor dense(const Linear& l, const at::Tensor& x) {
  if (given(l.codes16)) {
    at::Tensor y = owq16::mm(x, l.codes16, l.scales16, l.zeros16, 0);
    if (given(l.bias)) y.add_(l.bias);
    return y;
  }
  at::Tensor xb = x.to(at::kBFloat16);
  at::Tensor y = at::_weight_int4pack_mm_for_cpu(xb, l.packed, l.group, l.scale_zero);
  y = y.to(at::kFloat);
  if (given(l.correction)) {
    at::Tensor sums = xb.to(at::kFloat).view({x.size(0), -1, l.group_size}).sum(-1);
    y = at::addmm(y, sums, l.correction);
  }
  if (given(l.bias)) y.add_(l.bias);
  return y;
}

// y [B, out] += x[b, idx] @ table[slot(b)]: rows on the base (slot 0) in fp32 as the base's
// GEMM, rows on adapters with their inputs rounded to the table's fp16 (as `weak_bag`); sums
// in fp32, per row.
template <typename T>
void weak_rows(float* y, const float* x, int64_t in, const Linear& l, const T* table,
               const int64_t* slots, int64_t rows) {
  const int64_t k = l.idx.numel(), out = l.out, spans = l.spans.size(0);
  const int64_t* idx = l.idx.data_ptr<int64_t>();
  const int64_t* span = l.spans.data_ptr<int64_t>();
  const bool half = std::is_same<T, at::Half>::value;
  const int64_t grain = rows * k * out < (1 << 15) ? rows : 1;
  at::parallel_for(0, rows, grain, [&](int64_t b0, int64_t b1) {
    std::vector<float> acc(out), a(k);
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t slot = slots ? slots[b] : 0;
      std::fill(acc.begin(), acc.end(), 0.f);
      for (int64_t j = 0; j < k; ++j) {
        a[j] = x[b * in + idx[j]];
        if (half && slot != 0) a[j] = static_cast<float>(static_cast<at::Half>(a[j]));
      }
      // a fused layer's zeros outside its parts are skipped; up to 4 rows of one part at once
      for (int64_t r = 0; r < spans;) {
        const int64_t first = span[3 * r + 1], width = span[3 * r + 2];
        const T* rows[4];
        float coef[4];
        int64_t m = 0;
        for (; m < 4 && r + m < spans && span[3 * (r + m) + 1] == first &&
               span[3 * (r + m) + 2] == width;
             ++m) {
          const int64_t j = span[3 * (r + m)];
          rows[m] = table + (slot * k + j) * out + first;
          coef[m] = a[j];
        }
        axpy_rows(acc.data() + first, rows, coef, m, width);
        r += m;
      }
      float* yb = y + b * out;
      for (int64_t i = 0; i < out; ++i) yb[i] += acc[i];
    }
  });
}

at::Tensor project(const Linear& l, const at::Tensor& x, const at::Tensor& table,
                   const int64_t* slots) {
  at::Tensor y = dense(l, x);
  if (!given(l.idx)) return y;
  const float* xp = x.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  if (table.scalar_type() == at::kHalf && table.is_contiguous()) {
    weak_rows(yp, xp, x.size(1), l, table.data_ptr<at::Half>(), slots, x.size(0));
  } else {
    at::Tensor t = table.to(at::kFloat).contiguous();
    weak_rows(yp, xp, x.size(1), l, t.data_ptr<float>(), slots, x.size(0));
  }
  return y;
}

void rms_norm(float* out, const float* x, const float* w, int64_t n, float eps) {
  float ss = 0.f;
#pragma omp simd reduction(+ : ss)
  for (int64_t i = 0; i < n; ++i) ss += x[i] * x[i];
  const float r = 1.f / std::sqrt(ss / static_cast<float>(n) + eps);
  for (int64_t i = 0; i < n; ++i) out[i] = x[i] * r * w[i];
}

// v [D] <- v·cos + swap_halves(v)·signed_sin, the rows of the runtime's tables at one position.
void rope(float* v, const float* cos, const float* ssin, int64_t d, float* tmp) {
  const int64_t half = d / 2;
  for (int64_t i = 0; i < d; ++i) tmp[i] = v[i] * cos[i] + v[(i + half) % d] * ssin[i];
  std::copy(tmp, tmp + d, v);
}

class Stack {
 public:
  Stack(std::vector<std::vector<at::Tensor>> tensors, std::vector<std::vector<int64_t>> ints,
        std::vector<at::Tensor> norms, std::vector<at::Tensor> qk_norms, at::Tensor cos,
        at::Tensor ssin, int64_t heads, int64_t kv_heads, int64_t head_dim, double eps)
      : cos_(cos.contiguous()), ssin_(ssin.contiguous()), heads_(heads), kv_heads_(kv_heads),
        d_(head_dim), eps_(static_cast<float>(eps)) {
    TORCH_CHECK(cos_.dim() == 2 && cos_.sizes() == ssin_.sizes() && cos_.size(1) == head_dim &&
                    head_dim % 2 == 0,
                "rotary tables: fp32 [ctx, head_dim] twice");
    TORCH_CHECK(!norms.empty(), "no blocks");
    width_ = norms[0].numel();
    TORCH_CHECK(tensors.size() == ints.size() && tensors.size() % 4 == 0, "4 linears a block");
    TORCH_CHECK(norms.size() * 2 == tensors.size(), "2 norms a block");
    TORCH_CHECK(qk_norms.empty() || qk_norms.size() == norms.size(),
                "per-head q/k norms: none, or 2 a block");
    std::vector<Linear> linears;
    for (size_t i = 0; i < tensors.size(); ++i) {
      const auto& t = tensors[i];
      TORCH_CHECK(t.size() == 9 && ints[i].size() == 3, "linear ", i,
                  ": 9 tensors (torch's 4-bit kernel's 3, idx, bias, spans, the 16-bit GEMM's 3)",
                  " and 3 ints");
      Linear l;
      l.packed = t[0];
      l.scale_zero = t[1];
      l.correction = t[2];
      l.idx = t[3].to(at::kLong).contiguous();
      l.bias = t[4];
      l.spans = t[5].to(at::kLong).contiguous();
      if (given(t[6])) {
        TORCH_CHECK(owq16::supported(), "linear ", i, ": the 16-bit GEMM needs AVX2 and FMA");
        TORCH_CHECK(t[6].dim() == 3 && t[6].size(0) * 16 == ints[i][2] && t[7].dim() == 2 &&
                        t[7].size(1) == ints[i][2] && t[8].sizes() == t[7].sizes(),
                    "linear ", i, ": 16-bit GEMM operands of another shape");
        l.codes16 = t[6].contiguous();
        l.scales16 = t[7].to(at::kFloat).contiguous();
        l.zeros16 = t[8].to(at::kByte).contiguous();
      } else {
        TORCH_CHECK(given(t[0]), "linear ", i, ": no kernel's operands");
      }
      const int64_t* sp = l.spans.data_ptr<int64_t>();
      for (int64_t r = 0; r < l.spans.size(0); ++r) {
        TORCH_CHECK(sp[3 * r] >= 0 && sp[3 * r] < l.idx.numel() && sp[3 * r + 1] >= 0 &&
                        sp[3 * r + 2] >= 0 && sp[3 * r + 1] + sp[3 * r + 2] <= ints[i][2],
                    "linear ", i, ": span ", r, " outside the table");
      }
      l.group = ints[i][0];
      l.group_size = ints[i][1];
      l.out = ints[i][2];
      linears.push_back(l);
    }
    for (size_t b = 0; b < norms.size() / 2; ++b) {
      TORCH_CHECK(linears[4 * b].out == (heads + 2 * kv_heads) * head_dim && heads % kv_heads == 0,
                  "block ", b, ": q/k/v of ", linears[4 * b].out, " outputs for ", heads, "+2x",
                  kv_heads, " heads of ", head_dim);
      TORCH_CHECK(linears[4 * b + 2].out % 2 == 0, "block ", b, ": gate/up of odd width");
      TORCH_CHECK(norms[2 * b].numel() == width_ && norms[2 * b + 1].numel() == width_ &&
                      linears[4 * b + 1].out == width_ && linears[4 * b + 3].out == width_,
                  "block ", b, ": norms and outputs of another width than ", width_);
      Block blk{linears[4 * b], linears[4 * b + 1], linears[4 * b + 2], linears[4 * b + 3],
                norms[2 * b].contiguous(), norms[2 * b + 1].contiguous()};
      if (!qk_norms.empty()) {
        blk.q_norm = qk_norms[2 * b].contiguous();
        blk.k_norm = qk_norms[2 * b + 1].contiguous();
        TORCH_CHECK(blk.q_norm.numel() == head_dim && blk.k_norm.numel() == head_dim &&
                        blk.q_norm.scalar_type() == at::kFloat &&
                        blk.k_norm.scalar_type() == at::kFloat,
                    "block ", b, ": q/k norms not fp32 [", head_dim, "]");
      }
      blocks_.push_back(blk);
    }
  }

  // x [B, E] fp32 (the embedded tokens) -> [B, E] after every block; positions long [B] (each
  // row's token, written there); cache_rows long [B]: each row's row of k[i], v[i] [rows, Hkv,
  // ctx, D]; tables[4·i + j]: the j-th projection's slot table [S+1, k, out]; slots long [B] or
  // empty (every row on the base).
  at::Tensor step(at::Tensor x, at::Tensor positions, at::Tensor cache_rows,
                  const std::vector<at::Tensor>& k, const std::vector<at::Tensor>& v,
                  const std::vector<at::Tensor>& tables, at::Tensor slots) {
    TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat && x.size(1) == width_,
                "x: fp32 [B, E] of the model's width");
    TORCH_CHECK(k.size() == blocks_.size() && v.size() == blocks_.size(), "one cache a block");
    const size_t n = 4 * blocks_.size();
    TORCH_CHECK(tables.size() == n, "one table a projection");
    x = x.contiguous().clone();
    const int64_t rows = x.size(0), width = x.size(1);
    TORCH_CHECK(positions.numel() == rows, "one position a row");
    at::Tensor pos_t = positions.to(at::kLong).contiguous();
    const int64_t* pos = pos_t.data_ptr<int64_t>();
    at::Tensor slot_t = given(slots) ? slots.to(at::kLong).contiguous() : at::Tensor();
    const int64_t* slot = given(slot_t) ? slot_t.data_ptr<int64_t>() : nullptr;
    const int64_t ctx = cos_.size(0);
    for (int64_t b = 0; b < rows; ++b) {
      TORCH_CHECK(pos[b] >= 0 && pos[b] < ctx, "position ", pos[b], " outside the cache");
    }
    TORCH_CHECK(cache_rows.numel() == rows, "one cache row a row");
    at::Tensor crow_t = cache_rows.to(at::kLong).contiguous();
    const int64_t* crow = crow_t.data_ptr<int64_t>();
    TORCH_CHECK(!slot || slot_t.numel() == rows, "one slot a row");
    for (size_t i = 0; i < n; ++i) {
      const Linear& l = linear(i);
      TORCH_CHECK(tables[i].dim() == 3 && tables[i].size(0) == tables[0].size(0) &&
                      tables[i].size(1) == l.idx.numel() && tables[i].size(2) == l.out,
                  "projection ", i, ": a slot table of another shape");
    }
    for (int64_t b = 0; slot && b < rows; ++b) {
      TORCH_CHECK(slot[b] >= 0 && slot[b] < tables[0].size(0), "slot ", slot[b], " out of range");
    }
    at::Tensor h = at::empty_like(x);
    at::Tensor attn = at::empty({rows, heads_ * d_}, x.options());
    float* xp = x.data_ptr<float>();
    float* hp = h.data_ptr<float>();
    for (size_t i = 0; i < blocks_.size(); ++i) {
      const Block& blk = blocks_[i];
      norm_rows(hp, xp, blk.attn_norm, rows, width);
      at::Tensor qkv = project(blk.qkv, h, tables[4 * i], slot);
      attend(qkv, attn, pos, crow, k[i], v[i], blk.q_norm, blk.k_norm);
      at::Tensor o = project(blk.o, attn, tables[4 * i + 1], slot);
      x.add_(o);
      norm_rows(hp, xp, blk.mlp_norm, rows, width);
      at::Tensor gu = project(blk.gate_up, h, tables[4 * i + 2], slot);
      at::Tensor act = gated(gu);
      x.add_(project(blk.down, act, tables[4 * i + 3], slot));
    }
    return x;
  }

 private:
  // Rows of n values each, split across threads only where a prompt brings many (a decode
  // step's few rows run inline); each row's numbers are the same either way.
  static int64_t row_grain(int64_t n) { return std::max<int64_t>(1, (1 << 16) / n); }

  void norm_rows(float* out, const float* x, const at::Tensor& w, int64_t rows, int64_t n) {
    const float* wp = w.data_ptr<float>();
    at::parallel_for(0, rows, row_grain(n), [&](int64_t b0, int64_t b1) {
      for (int64_t b = b0; b < b1; ++b) rms_norm(out + b * n, x + b * n, wp, n, eps_);
    });
  }

  // silu(gate)·up of [B, 2·I] -> [B, I].
  static at::Tensor gated(const at::Tensor& gu) {
    const int64_t rows = gu.size(0), inter = gu.size(1) / 2;
    at::Tensor out = at::empty({rows, inter}, gu.options());
    const float* g = gu.data_ptr<float>();
    float* o = out.data_ptr<float>();
    at::parallel_for(0, rows, row_grain(inter), [&](int64_t b0, int64_t b1) {
      for (int64_t b = b0; b < b1; ++b) {
        const float* gb = g + b * 2 * inter;
        for (int64_t i = 0; i < inter; ++i) {
          const float a = gb[i];
          o[b * inter + i] = a / (1.f + std::exp(-a)) * gb[inter + i];
        }
      }
    });
    return out;
  }

  // Each row's q and k heads normed (where the block has q/k norms) and rotated, k and v
  // written at the row's position of its cache row, then (every row written) each query head
  // over its key head's positions 0 .. pos into attn [B, Hq·D].
  void attend(at::Tensor& qkv, at::Tensor& attn, const int64_t* pos, const int64_t* crow,
              const at::Tensor& kc, const at::Tensor& vc, const at::Tensor& q_norm,
              const at::Tensor& k_norm) {
    const int64_t rows = qkv.size(0), width = qkv.size(1), d = d_;
    const int64_t hq = heads_, hkv = kv_heads_, groups = hq / hkv;
    TORCH_CHECK(kc.dim() == 4 && kc.size(1) == hkv && kc.size(3) == d, "cache of another shape");
    const int64_t ctx = kc.size(2);
    TORCH_CHECK(kc.is_contiguous() && vc.is_contiguous() && kc.scalar_type() == at::kFloat &&
                    vc.sizes() == kc.sizes() && vc.scalar_type() == at::kFloat,
                "the cache: two contiguous fp32 [rows, Hkv, ctx, D] tensors a block");
    for (int64_t b = 0; b < rows; ++b) {
      TORCH_CHECK(pos[b] < ctx, "position ", pos[b], " outside the cache");
      TORCH_CHECK(crow[b] >= 0 && crow[b] < kc.size(0), "cache row ", crow[b], " out of range");
    }
    float* q = qkv.data_ptr<float>();
    float* kp = kc.data_ptr<float>();
    float* vp = vc.data_ptr<float>();
    const float* cos = cos_.data_ptr<float>();
    const float* ssin = ssin_.data_ptr<float>();
    const float* qn = given(q_norm) ? q_norm.data_ptr<float>() : nullptr;
    const float* kn = given(k_norm) ? k_norm.data_ptr<float>() : nullptr;
    std::vector<float> tmp(d);
    for (int64_t b = 0; b < rows; ++b) {
      float* row = q + b * width;
      const float* c = cos + pos[b] * d;
      const float* s = ssin + pos[b] * d;
      for (int64_t h = 0; h < hq + hkv; ++h) {
        const float* w = h < hq ? qn : kn;
        if (w) rms_norm(row + h * d, row + h * d, w, d, eps_);  // in place: x[i] read first
        rope(row + h * d, c, s, d, tmp.data());
      }
      for (int64_t h = 0; h < hkv; ++h) {
        const int64_t where = ((crow[b] * hkv + h) * ctx + pos[b]) * d;
        std::copy(row + (hq + h) * d, row + (hq + h + 1) * d, kp + where);
        std::copy(row + (hq + hkv + h) * d, row + (hq + hkv + h + 1) * d, vp + where);
      }
    }
    const float scale = 1.f / std::sqrt(static_cast<float>(d));
    float* out = attn.data_ptr<float>();
    int64_t work = 0;
    for (int64_t b = 0; b < rows; ++b) work += (pos[b] + 1) * hq * d;
    const int64_t grain = work < (1 << 16) ? rows * hq : 1;
    at::parallel_for(0, rows * hq, grain, [&](int64_t i0, int64_t i1) {
      std::vector<float> p;
      for (int64_t i = i0; i < i1; ++i) {
        const int64_t b = i / hq, head = i % hq, kvh = head / groups, len = pos[b] + 1;
        const float* qh = q + b * width + head * d;
        const float* keys = kp + (crow[b] * hkv + kvh) * ctx * d;
        const float* vals = vp + (crow[b] * hkv + kvh) * ctx * d;
        p.resize(len);
        float top = -INFINITY;
        for (int64_t t = 0; t < len; ++t) {
          p[t] = dot(qh, keys + t * d, d) * scale;
          top = std::max(top, p[t]);
        }
        float sum = 0.f;
        for (int64_t t = 0; t < len; ++t) sum += (p[t] = std::exp(p[t] - top));
        float* oh = out + b * hq * d + head * d;
        std::fill(oh, oh + d, 0.f);
        for (int64_t t = 0; t < len; ++t) axpy(oh, vals + t * d, p[t], d);
        const float inv = 1.f / sum;
        for (int64_t j = 0; j < d; ++j) oh[j] *= inv;
      }
    });
  }

  const Linear& linear(size_t i) const {
    const Block& b = blocks_[i / 4];
    const Linear* four[] = {&b.qkv, &b.o, &b.gate_up, &b.down};
    return *four[i % 4];
  }

  std::vector<Block> blocks_;
  at::Tensor cos_, ssin_;
  int64_t heads_, kv_heads_, d_, width_ = 0;
  float eps_;
};

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  pybind11::class_<Stack>(m, "Stack")
      .def(pybind11::init<std::vector<std::vector<at::Tensor>>, std::vector<std::vector<int64_t>>,
                          std::vector<at::Tensor>, std::vector<at::Tensor>, at::Tensor,
                          at::Tensor, int64_t, int64_t, int64_t, double>())
      .def("step", &Stack::step, pybind11::call_guard<pybind11::gil_scoped_release>());
  m.def("gemm16_supported", &owq16::supported);
  m.def("gemm16", &owq16::mm, pybind11::arg("x"), pybind11::arg("codes"), pybind11::arg("scales"),
        pybind11::arg("zeros"), pybind11::arg("form") = 0,
        pybind11::call_guard<pybind11::gil_scoped_release>());
  m.def("gemm16_level", &owq16::level);
}
