// CPU sparse x dense products Y [M, N] = X [M, K] · Wᵀ (+ bias, exact GELU) for the csr, bsr
// and 2:4 formats: the plain-pointer interface between the torch-facing unit (cpu_ops.cpp:
// checks, threads, dtypes) and the ISA units (spmm_avx2.cpp, spmm_portable.cpp).
//
// Orientation (XNNPACK's f32-spmm): the kernels compute Yᵀ = W·Xᵀ, so each stored weight meets
// a contiguous run of tokens. X is first packed into token tiles ("panels"): panel t starts at
// t·kp·tile and holds Xᵀ[k][j] = X[t·tile + j][k] for k < kp, j < its width (rows `width`
// floats apart; zeros past M and past K), so one K-block of a panel stays in L1 while every
// row of W streams over it.
//
// No torch (or other C++ library) header may be included by an ISA unit: an inline function
// compiled there with AVX2 could be picked by the linker for every caller (a SIGILL on a CPU
// without AVX2). The ISA units only use intrinsics, plain loops and this header (<immintrin.h>
// itself pulls in <stdlib.h>, whose inline functions they never call); what they export is
// checked by tests/test_cpu_kernels.py::test_isa_units_export_only_entry_points (nm).
#pragma once

#include <cstdint>

namespace sparse_prune {
namespace cpu {


// The problem every kernel shares.
struct Problem {
  int64_t M = 0, N = 0, K = 0;
  int64_t tile = 8;       // tokens per panel (a multiple of the ISA's vector width)
  int64_t last_tile = 8;  // tokens in the last panel (<= tile, same multiple): the others are `tile`
  int64_t ntiles = 0;     // panels: ceil(M / tile)
  int64_t kp = 0;       // rows of a panel: K rounded up to the bsr block width (K otherwise)
  int64_t kblock = 0;   // K-block in columns (a multiple of 16; bsr: of the block width)
  int64_t weight_budget = 0;  // bytes of stored weight per row block (kept in L2 across tiles)
  int64_t panel_budget = 0;   // bytes of X panels per tile group (kept in L2 across row blocks)
  const void* bias = nullptr;  // [N] of the compute type, or null
  bool gelu = false;           // exact (erf) GELU after the bias
  void* y = nullptr;           // [M, N] row-major of the compute type
  // Instead of y: the next layer's panels (ntiles x y_kp x tile, this layer's tiles), written
  // as that layer's pack would write act(Yᵀ + bias): rows < N, zeros past M (sparse_mlp).
  void* y_panels = nullptr;
  int64_t y_kp = 0;
};

// index_bytes: 2, 4 or 8 (int16, int32, int64 column indices).
struct CsrWeight {
  const void* values = nullptr;     // [nnz]
  const int64_t* crow = nullptr;    // [N + 1], validated by the caller
  const void* col = nullptr;        // [nnz], checked by the kernels (range, sorted rows)
  int index_bytes = 4;
};

struct BsrWeight {
  const void* values = nullptr;     // [nblocks, bm, bk]
  const int64_t* crow = nullptr;    // [ceil(N / bm) + 1], validated by the caller
  const void* col = nullptr;        // [nblocks] block columns, checked by the kernels
  int index_bytes = 4;
  int64_t bm = 1, bk = 1;
};

struct Semi24Weight {
  const void* values = nullptr;     // [N, K/2]
  const int16_t* meta = nullptr;    // [N, ceil(K/16)] (docs/semi_structured_layout.md)
  int64_t meta_cols = 0;
};

// A csr weight laid out once for the segment kernel (csr_segs), float32 only. Rows are cut into
// blocks of `rows_per_block` and columns into sub-blocks of `span`; the stored weights of each
// (row block, sub-block) are contiguous, segment by segment. A segment is one row, or two rows
// run together (two independent accumulator chains): the columns both rows keep (`shared`: one
// loaded Xᵀ vector feeds an FMA of each row), then `paired` weights of each row alone, side by
// side, then `tail` more of the first row. Sub-block 0 lists every row of the block (some with 0
// weights: they start their Yᵀ row); later ones only the rows with weights there. Built and
// checked by segments.cpp from a checked csr weight.
//
// A segment's stored weights, in order: `shared` pairs (row0's, row1's), `paired` of row0,
// `paired` of row1, `tail` of row0: 2 * shared + 2 * paired + tail values and
// shared + 2 * paired + tail columns. A lone row has row1 = -1, shared = paired = 0.
struct SegmentHead {
  int32_t row0, row1, shared, paired, tail;
};

struct CsrSegments {
  int64_t rows_per_block = 0, span = 0;  // R rows, `span` columns (a multiple of 16, at most 256)
  int64_t nrb = 0, nsb = 0;              // row blocks, sub-blocks
  const int64_t* block_seg = nullptr;    // [nrb * nsb + 1]: first segment of (row block, sub-block)
  const int64_t* block_val = nullptr;    // [nrb * nsb + 1]: first stored value of each
  const int64_t* block_col = nullptr;    // [nrb * nsb + 1]: first stored column of each
  const SegmentHead* seg = nullptr;      // [segments]
  const float* values = nullptr;         // in segment order
  const uint8_t* col = nullptr;          // columns within their sub-block, in segment order
};

// Kernel status codes (0 = ok); the caller turns them into errors naming the argument.
constexpr int kOk = 0;
constexpr int kColOutOfRange = 1;
constexpr int kColUnsorted = 2;
constexpr int kPaddingNonZero = 3;  // bsr: a stored value in the padding past K is not 0
constexpr int kBadMeta = 4;         // 2:4: a group's two column indices are not increasing

// Scratch one worker needs for rows [r0, r1) (bsr: block rows): the Yᵀ tile of a row block (at
// most all its rows; floats) and the K-block boundaries (int64). Same for every ISA.
int64_t scratch_floats(const Problem& p, int64_t rows);
int64_t scratch_bounds(const Problem& p, int64_t rows);
// Entries per unit in the K-block bounds that *_index writes (nkb + 1 for p.kblock).
int64_t bounds_stride(const Problem& p);

#define SPARSE_PRUNE_CPU_ISA_API(ns, T)                                                           \
  namespace ns {                                                                                  \
  /* Pack tiles [t0, t1) of x [M, K] into xp (ntiles x kp x tile). */                             \
  void pack_x(const Problem& p, const T* x, T* xp, int64_t t0, int64_t t1);                       \
  /* The index pass of rows [r0, r1): checks their column indices and writes their K-block      \
     bounds for p.kblock, row r0's first (bounds_stride(p) apart). Returns a status code. */      \
  int csr_index(const Problem& p, const CsrWeight& w, int64_t r0, int64_t r1, int64_t* bounds);   \
  /* Rows [r0, r1) of Y over every tile; indexed: csr_index already ran on them into bounds. */  \
  int csr_rows(const Problem& p, const CsrWeight& w, const T* xp, int64_t r0, int64_t r1,         \
               T* yt, int64_t* bounds, bool indexed);                                             \
  /* Block rows [b0, b1). */                                                                      \
  int bsr_index(const Problem& p, const BsrWeight& w, int64_t b0, int64_t b1, int64_t* bounds);   \
  int bsr_rows(const Problem& p, const BsrWeight& w, const T* xp, int64_t b0, int64_t b1,         \
               T* yt, int64_t* bounds, bool indexed);                                             \
  /* checked: semi24_check already passed rows [r0, r1). */                                      \
  int semi24_check(const Problem& p, const Semi24Weight& w, int64_t r0, int64_t r1);              \
  int semi24_rows(const Problem& p, const Semi24Weight& w, const T* xp, int64_t r0, int64_t r1,   \
                  T* yt, bool checked);                                                           \
  }

// Entry points of an ISA unit built for another architecture: present, never called
// (compiled() is false).
#define SPARSE_PRUNE_ABSENT_ENTRY_POINTS                                                                   \
  bool compiled() { return false; }                                                                        \
  void pack_x(const Problem&, const float*, float*, int64_t, int64_t) {}                                   \
  int csr_index(const Problem&, const CsrWeight&, int64_t, int64_t, int64_t*) { return kOk; }              \
  int csr_rows(const Problem&, const CsrWeight&, const float*, int64_t, int64_t, float*, int64_t*, bool) { return kOk; } \
  int bsr_index(const Problem&, const BsrWeight&, int64_t, int64_t, int64_t*) { return kOk; }              \
  int bsr_rows(const Problem&, const BsrWeight&, const float*, int64_t, int64_t, float*, int64_t*, bool) { return kOk; } \
  int semi24_check(const Problem&, const Semi24Weight&, int64_t, int64_t) { return kOk; }                  \
  int semi24_rows(const Problem&, const Semi24Weight&, const float*, int64_t, int64_t, float*, bool) { return kOk; } \
  void csr_segs(const Problem&, const CsrSegments&, const float*, int64_t, int64_t, float*) {}

// Row blocks [rb0, rb1) of a segment-laid-out csr weight over every tile, into Y (or the next
// layer's panels); yt holds the Yᵀ rows [rb0·R, min(N, rb1·R)) of the widest tile (R: rows per
// block; the sub-blocks-outer order uses them all at once). Float32 units only.
#define SPARSE_PRUNE_CPU_SEGS_API(ns) \
  namespace ns {                      \
  void csr_segs(const Problem& p, const CsrSegments& w, const float* xp, int64_t rb0, int64_t rb1, float* yt); \
  }
SPARSE_PRUNE_CPU_SEGS_API(avx2_f32)
SPARSE_PRUNE_CPU_SEGS_API(avx512_f32)
SPARSE_PRUNE_CPU_SEGS_API(portable_f32)
#undef SPARSE_PRUNE_CPU_SEGS_API

namespace avx2_f32 { bool compiled(); }
namespace avx512_f32 { bool compiled(); }
SPARSE_PRUNE_CPU_ISA_API(avx2_f32, float)
SPARSE_PRUNE_CPU_ISA_API(avx512_f32, float)
SPARSE_PRUNE_CPU_ISA_API(portable_f32, float)
SPARSE_PRUNE_CPU_ISA_API(portable_f64, double)

#undef SPARSE_PRUNE_CPU_ISA_API

}  // namespace cpu
}  // namespace sparse_prune
