// AVX2 + FMA micro-kernels (float32). This whole unit is compiled for avx2,fma (the pragma
// below) and only called after a runtime check (cpu_ops.cpp: __builtin_cpu_supports); it
// includes no C++ library header (see spmm.h), and everything but the entry points has
// internal linkage.
#if defined(__x86_64__) || defined(_M_X64)
#if defined(__clang__)  // clang ignores `#pragma GCC target`: give every function the attribute
#pragma clang attribute push(__attribute__((target("avx2,fma"))), apply_to = function)
#else
#pragma GCC target("avx2,fma")
#endif
#define SPARSE_PRUNE_HAVE_AVX2 1
#include <immintrin.h>
#endif

#include "attention.h"
#include "spmm.h"

namespace sparse_prune {
namespace cpu {
namespace avx2_f32 {

#if SPARSE_PRUNE_HAVE_AVX2

bool compiled() { return true; }

namespace {

#include "spmm_driver.h"

#include "spmm_x86_common.h"

// up to 48 tokens: 6 ymm per accumulator set; 4-row blocks 2 ymm at a time (8 accumulators +
// 4 broadcasts + 1 load of 16 registers)
using Avx2 = SimdMicro<Ymm, 6, 2>;

#include "attention_kernel.h"

// 6 query rows x 16 columns: 12 accumulators + 2 loads + a broadcast of 16 ymm
using Attention256 = AttentionKernel<Ymm, 6, 2>;

}  // namespace

SPARSE_PRUNE_ENTRY_POINTS(Avx2, float)
SPARSE_PRUNE_SEGS_ENTRY_POINT(Avx2)
SPARSE_PRUNE_ATTENTION_ENTRY_POINTS(Attention256)

#else  // not x86-64: the entry points exist but are never called (compiled() is false)

SPARSE_PRUNE_ABSENT_ENTRY_POINTS
SPARSE_PRUNE_ABSENT_ATTENTION_ENTRY_POINTS

#endif

}  // namespace avx2_f32
}  // namespace cpu
}  // namespace sparse_prune

#if defined(__clang__) && (defined(__x86_64__) || defined(_M_X64))
#pragma clang attribute pop
#endif
