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
#endif
#define SPARSE_PRUNE_HAVE_AVX512 1
#include <immintrin.h>
#endif

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
  static inline R zero() { return _mm512_setzero_ps(); }
  static inline R load(const float* p) { return _mm512_loadu_ps(p); }
  static inline void store(float* p, R v) { _mm512_storeu_ps(p, v); }
  static inline R bcast(const float* p) { return _mm512_set1_ps(*p); }
  static inline R fma(R w, R x, R a) { return _mm512_fmadd_ps(w, x, a); }
  static inline R add(R a, R b) { return _mm512_add_ps(a, b); }
};

// up to 128 tokens: 8 zmm per accumulator set; 4-row blocks 4 zmm at a time (16 accumulators
// + 4 broadcasts + 1 load of 32 registers)
using Avx512 = SimdMicro<Zmm, 8, 4>;

}  // namespace

SPARSE_PRUNE_ENTRY_POINTS(Avx512, float)

#else  // not x86-64: the entry points exist but are never called (compiled() is false)

SPARSE_PRUNE_ABSENT_ENTRY_POINTS

#endif

}  // namespace avx512_f32
}  // namespace cpu
}  // namespace sparse_prune

#if defined(__clang__) && (defined(__x86_64__) || defined(_M_X64))
#pragma clang attribute pop
#endif
