// AVX-512F micro-kernels (float32): the same loop nest and register tiling as the AVX2 unit,
// with 16-float zmm vectors (up to 4 per accumulator set: 64-token tiles). Compiled for
// avx512f,avx2,fma by the pragma below and only called after a runtime check (cpu_ops.cpp);
// the panel packing and the epilogue are the AVX2 ones (spmm_x86_common.h). Like every ISA
// unit, it includes no C++ library header and exports only its entry points.
#if defined(__x86_64__) || defined(_M_X64)
#if defined(__clang__)  // clang ignores `#pragma GCC target`: give every function the attribute
#pragma clang attribute push(__attribute__((target("avx512f,avx2,fma"))), apply_to = function)
#else
#pragma GCC target("avx512f,avx2,fma")
// gcc 12 takes the _mm512_undefined_ps() operand inside its own unpack/shuffle intrinsics for
// an uninitialized read (a false positive of its header, not of this code)
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif
#define SPARSE_PRUNE_HAVE_AVX512 1
#include <immintrin.h>
#endif

#include "attention.h"
#include "spmm.h"

namespace sparse_prune {
namespace cpu {
namespace avx512_f32 {

#if SPARSE_PRUNE_HAVE_AVX512

bool compiled() { return true; }

namespace {

#include "spmm_driver.h"

#include "spmm_x86_common.h"

struct Zmm {
  using R = __m512;
  static constexpr int kLanes = 16;
  static constexpr int kRegs = 32;
  static inline R zero() { return _mm512_setzero_ps(); }
  static inline R load(const float* p) { return _mm512_loadu_ps(p); }
  static inline void store(float* p, R v) { _mm512_storeu_ps(p, v); }
  static inline R bcast(const float* p) { return _mm512_set1_ps(*p); }
  static inline R bcast4(const float* p) { return _mm512_broadcast_f32x4(_mm_loadu_ps(p)); }
  template <int U>
  static inline R lane(R w) { return _mm512_permute_ps(w, U * 0x55); }
  static inline R fma(R w, R x, R a) { return _mm512_fmadd_ps(w, x, a); }
  static inline R add(R a, R b) { return _mm512_add_ps(a, b); }
  // for attention_kernel.h (exp_neg below exp_split16)
  static inline R set1(float v) { return _mm512_set1_ps(v); }
  static inline R sub(R a, R b) { return _mm512_sub_ps(a, b); }
  static inline R mul(R a, R b) { return _mm512_mul_ps(a, b); }
  static inline R max(R a, R b) { return _mm512_max_ps(a, b); }
  static inline float hmax(R v) { return _mm512_reduce_max_ps(v); }
  static inline float hsum(R v) { return _mm512_reduce_add_ps(v); }
  static inline R exp_neg(R x);
};

// exp(a + b) for a + b <= 0: exp_split of spmm_x86_common.h on 16 lanes (same reduction,
// same polynomial, same error).
inline __m512 exp_split16(__m512 a, __m512 b) {
  const __m512 lo = _mm512_set1_ps(-87.3f);
  const __m512 sum = _mm512_add_ps(a, b);
  const __mmask16 in_range = _mm512_cmp_ps_mask(sum, lo, _CMP_GE_OQ);
  const __m512 x = _mm512_max_ps(sum, lo);
  const __m512 fx = _mm512_roundscale_ps(_mm512_fmadd_ps(x, _mm512_set1_ps(1.44269504088896341f), _mm512_set1_ps(0.5f)),
                                         _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(fx, _mm512_set1_ps(0.693359375f), _mm512_max_ps(a, lo));
  r = _mm512_add_ps(r, b);
  r = _mm512_fnmadd_ps(fx, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 y = _mm512_set1_ps(1.9875691500e-4f);
  y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(1.3981999507e-3f));
  y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(8.3334519073e-3f));
  y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(4.1665795894e-2f));
  y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(1.6666665459e-1f));
  y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(5.0000001201e-1f));
  y = _mm512_fmadd_ps(y, _mm512_mul_ps(r, r), _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
  const __m512i e = _mm512_slli_epi32(_mm512_add_epi32(_mm512_cvtps_epi32(fx), _mm512_set1_epi32(127)), 23);
  return _mm512_maskz_mov_ps(in_range, _mm512_mul_ps(y, _mm512_castsi512_ps(e)));
}

inline __m512 Zmm::exp_neg(__m512 x) { return exp_split16(x, _mm512_setzero_ps()); }

// The exact GELU of spmm_x86_common.h's gelu() on 16 lanes (same erfc, same special values).
inline __m512 gelu16(__m512 x) {
  const __m512 ax = _mm512_min_ps(_mm512_abs_ps(x), _mm512_set1_ps(20.0f));  // NaN -> 20, as there
  const __m512 z = _mm512_mul_ps(ax, _mm512_set1_ps(0.70710678118654752f));
  const __m512 t = _mm512_div_ps(_mm512_set1_ps(1.0f), _mm512_fmadd_ps(z, _mm512_set1_ps(0.5f), _mm512_set1_ps(1.0f)));
  __m512 q = _mm512_set1_ps(0.17087277f);
  q = _mm512_fmadd_ps(q, t, _mm512_set1_ps(-0.82215223f));
  q = _mm512_fmadd_ps(q, t, _mm512_set1_ps(1.48851587f));
  q = _mm512_fmadd_ps(q, t, _mm512_set1_ps(-1.13520398f));
  q = _mm512_fmadd_ps(q, t, _mm512_set1_ps(0.27886807f));
  q = _mm512_fmadd_ps(q, t, _mm512_set1_ps(-0.18628806f));
  q = _mm512_fmadd_ps(q, t, _mm512_set1_ps(0.09678418f));
  q = _mm512_fmadd_ps(q, t, _mm512_set1_ps(0.37409196f));
  q = _mm512_fmadd_ps(q, t, _mm512_set1_ps(1.00002368f));
  q = _mm512_fmadd_ps(q, t, _mm512_set1_ps(-1.26551223f));
  const __m512 x2 = _mm512_mul_ps(ax, ax);
  const __m512 x2_err = _mm512_fmsub_ps(ax, ax, x2);
  const __m512 half = _mm512_set1_ps(0.5f);
  const __m512 e = exp_split16(_mm512_mul_ps(x2, _mm512_set1_ps(-0.5f)), _mm512_fnmadd_ps(x2_err, half, q));
  const __m512 half_erfc = _mm512_mul_ps(_mm512_mul_ps(t, half), e);
  const __mmask16 neg = _mm512_cmp_ps_mask(x, _mm512_setzero_ps(), _CMP_LT_OQ);
  const __m512 phi = _mm512_mask_blend_ps(neg, _mm512_sub_ps(_mm512_set1_ps(1.0f), half_erfc), half_erfc);
  return _mm512_mul_ps(x, phi);
}

// 16x16 transpose: v[i] (row i) becomes column i. Within each 128-bit lane L the unpack and
// shuffle steps leave s[4b + c] = column 4L + c of rows 4b..4b+3; two shuffle_f32x4 rounds
// then gather lane L of s[c], s[4 + c], s[8 + c], s[12 + c] into column 4L + c.
inline void transpose16(__m512 (&v)[16]) {
  __m512 t[16], s[16];
  for (int i = 0; i < 8; ++i) {
    t[2 * i] = _mm512_unpacklo_ps(v[2 * i], v[2 * i + 1]);
    t[2 * i + 1] = _mm512_unpackhi_ps(v[2 * i], v[2 * i + 1]);
  }
  for (int b = 0; b < 4; ++b) {
    s[4 * b + 0] = _mm512_shuffle_ps(t[4 * b + 0], t[4 * b + 2], 0x44);
    s[4 * b + 1] = _mm512_shuffle_ps(t[4 * b + 0], t[4 * b + 2], 0xEE);
    s[4 * b + 2] = _mm512_shuffle_ps(t[4 * b + 1], t[4 * b + 3], 0x44);
    s[4 * b + 3] = _mm512_shuffle_ps(t[4 * b + 1], t[4 * b + 3], 0xEE);
  }
  for (int c = 0; c < 4; ++c) {
    const __m512 p0 = _mm512_shuffle_f32x4(s[c], s[4 + c], 0x44), p1 = _mm512_shuffle_f32x4(s[c], s[4 + c], 0xEE);
    const __m512 q0 = _mm512_shuffle_f32x4(s[8 + c], s[12 + c], 0x44), q1 = _mm512_shuffle_f32x4(s[8 + c], s[12 + c], 0xEE);
    v[c] = _mm512_shuffle_f32x4(p0, q0, 0x88);
    v[4 + c] = _mm512_shuffle_f32x4(p0, q0, 0xDD);
    v[8 + c] = _mm512_shuffle_f32x4(p1, q1, 0x88);
    v[12 + c] = _mm512_shuffle_f32x4(p1, q1, 0xDD);
  }
}

// up to 128 tokens: 8 zmm per accumulator set; 4-row blocks 4 zmm at a time (16 accumulators
// + 4 broadcasts + 1 load of 32 registers)
struct Avx512 : SimdMicro<Zmm, 8, 4> {
  // X86Common::epilogue's contract, 16 rows x 16 tokens per transpose with the 16-lane GELU:
  // whole 64-byte lines per token and half the GELU instructions. The epilogue was 12% of a
  // 90%-csr ViT-B/16 forward with the 8x8 AVX2 one (perf, 1 thread); the last rows % 16 still
  // go through that one.
  static void epilogue(const Problem& p, const float* yt, int64_t t, int64_t r0, int64_t r1) {
    const int64_t tok0 = t * p.tile;
    const int64_t valid = p.M - tok0 < p.tile ? p.M - tok0 : p.tile;
    const float* bias = static_cast<const float*>(p.bias);
    float* y = static_cast<float*>(p.y) + tok0 * p.N;
    const int64_t r16 = (r1 - r0) / 16 * 16;
    for (int64_t j = 0; j < valid; j += 16) {
      const int64_t n = valid - j < 16 ? valid - j : 16;
      for (int64_t r = 0; r < r16; r += 16) {
        const __m512 bv = bias ? _mm512_loadu_ps(bias + r0 + r) : _mm512_setzero_ps();
        __m512 v[16];
        for (int i = 0; i < 16; ++i) v[i] = _mm512_loadu_ps(yt + (r + i) * p.tile + j);
        transpose16(v);
        float* out = y + j * p.N + r0 + r;
        // unrolled, so that v stays in registers (a run-time index would put it on the stack)
        if (p.gelu) {
#pragma GCC unroll 16
          for (int u = 0; u < 16; ++u)
            if (u < n) _mm512_storeu_ps(out + u * p.N, gelu16(_mm512_add_ps(v[u], bv)));
        } else {
#pragma GCC unroll 16
          for (int u = 0; u < 16; ++u)
            if (u < n) _mm512_storeu_ps(out + u * p.N, _mm512_add_ps(v[u], bv));
        }
      }
    }
    if (r16 < r1 - r0) X86Common::epilogue(p, yt + r16 * p.tile, t, r0 + r16, r1);
  }

  // X86Common::pack with 16x16 transposes: whole 64-byte lines per panel row (the 8x8 AVX2
  // transposes wrote each line in two halves).
  static void pack(const Problem& p, const float* x, float* xp, int64_t t) {
    const int64_t tok0 = t * p.tile;
    const int64_t width = tile_width(p, t);
    float* panel = xp + t * p.kp * p.tile;
    const int64_t k16 = p.K / 16 * 16;
    for (int64_t j = 0; j < width; j += 16) {
      const int64_t n = p.M - tok0 - j < 16 ? p.M - tok0 - j : 16;  // valid tokens (may be <= 0)
      const float* src = x + (tok0 + j) * p.K;
      for (int64_t k = 0; k < k16; k += 16) {
        __m512 v[16];
#pragma GCC unroll 16
        for (int u = 0; u < 16; ++u) v[u] = u < n ? _mm512_loadu_ps(src + u * p.K + k) : _mm512_setzero_ps();
        transpose16(v);
#pragma GCC unroll 16
        for (int u = 0; u < 16; ++u) _mm512_storeu_ps(panel + (k + u) * width + j, v[u]);
      }
      for (int64_t k = k16; k < p.kp; ++k)
        for (int64_t u = 0; u < 16; ++u)
          panel[k * width + j + u] = (u < n && k < p.K) ? src[u * p.K + k] : 0.0f;
    }
  }

  // X86Common::to_panels on 16 lanes (tile widths are multiples of 16 here).
  static void to_panels(const Problem& p, const float* yt, int64_t t, int64_t r0, int64_t r1) {
    const int64_t valid = p.M - t * p.tile < p.tile ? p.M - t * p.tile : p.tile;
    const int64_t width = tile_width(p, t);
    const float* bias = static_cast<const float*>(p.bias);
    float* panel = static_cast<float*>(p.y_panels) + t * p.y_kp * p.tile;
    for (int64_t r = r0; r < r1; ++r) {
      const float* s = yt + (r - r0) * p.tile;
      float* d = panel + r * width;
      const __m512 bv = _mm512_set1_ps(bias ? bias[r] : 0.0f);
      for (int64_t j = 0; j < width; j += 16) {
        __m512 o = _mm512_add_ps(_mm512_loadu_ps(s + j), bv);
        if (p.gelu) o = gelu16(o);
        const int64_t left = valid - j;  // the tokens past M are 0 in a panel
        const __mmask16 keep = left >= 16 ? __mmask16(0xFFFF) : left <= 0 ? __mmask16(0) : __mmask16((1u << left) - 1u);
        _mm512_storeu_ps(d + j, _mm512_maskz_mov_ps(keep, o));
      }
    }
  }
};

#include "attention_kernel.h"

// 6 query rows x 64 columns: 24 accumulators + 4 loads + a broadcast of 32 zmm
using Attention512 = AttentionKernel<Zmm, 6, 4>;

}  // namespace

SPARSE_PRUNE_ENTRY_POINTS(Avx512, float)
SPARSE_PRUNE_SEGS_ENTRY_POINT(Avx512)
SPARSE_PRUNE_ATTENTION_ENTRY_POINTS(Attention512)

#else  // not x86-64: the entry points exist but are never called (compiled() is false)

SPARSE_PRUNE_ABSENT_ENTRY_POINTS
SPARSE_PRUNE_ABSENT_ATTENTION_ENTRY_POINTS

#endif

}  // namespace avx512_f32
}  // namespace cpu
}  // namespace sparse_prune

#if defined(__clang__) && (defined(__x86_64__) || defined(_M_X64))
#pragma clang attribute pop
#endif
