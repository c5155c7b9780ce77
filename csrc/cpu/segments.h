// The segment layout of a csr weight (spmm.h's CsrSegments): built once per weight from its
// checked csr arrays and cached while those tensors live unchanged, so the csr ops of
// cpu_ops.cpp run the segment kernel (csr_segs) without a per-call index pass.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <memory>
#include <vector>

#include "spmm.h"

namespace sparse_prune {
namespace cpu {

struct SegmentLayout {
  at::Tensor block_seg, block_val, block_col, seg, values, col;  // the arrays `view` points into
  std::vector<int64_t> cum;  // [nrb + 1]: stored weights before each row block (the row split's cost)
  CsrSegments view;
};

// The sub-block width for a weight with `density` stored weights per column on an ISA whose
// widest token tile is `max_tile` floats: columns of the tile's panel that stay in L1 while a
// row's segment in them holds ~10 (90% sparse) to ~30 (50%) weights. Measured in a standalone
// loop (AVX-512, 112- and 128-token tiles, fc1/fc2 shapes, row blocks of 64-256): best spans were
// 128 at 5% density, 96 at 10% and 48-64 from 20% to 50%. At most 256 (columns are stored as
// uint8 offsets within their sub-block).
int64_t segment_span(double density, int64_t max_tile);

// Rows per row block (`rows` below; cpu_ops.cpp's SPARSE_PRUNE_CPU_SEGMENT_ROWS overrides it): 256
// was best or within 3% of it in the same measurements.
constexpr int64_t kSegmentRows = 256;

// The rows per row block of an N-row weight: kSegmentRows, except that an odd number of blocks
// above one becomes an even number of blocks of ceil(N / count) rows, the least such count
// (N = 768: 4 of 192, not 3 of 256; N = 513: 129, 129, 129, 126), so that the token split
// (cpu_ops.cpp) can cut a tile between two workers at half its row blocks.
int64_t segment_rows(int64_t N);

// The csr index pass of an ISA unit (spmm.h's csr_index): checks rows [r0, r1) and writes their
// K-block bounds for p.kblock.
using CsrIndexFn = int (*)(const Problem&, const CsrWeight&, int64_t, int64_t, int64_t*);

// The layout of the csr weight `w` [N, K] (float32 values, int64 crow, checked by the caller;
// values_src, crow_src, col_src: the tensors passed to the op), or null when it is not used:
// SPARSE_PRUNE_CPU_SEGMENTS=0, an inference tensor among them (its in-place changes are not
// versioned, so a cached copy could go stale), or N, K or nnz beyond int32. Built on a cache miss
// after `index` checked every row (sub-blocks as K-blocks); on a bad column index sets *status
// (kColOutOfRange / kColUnsorted) and returns null. The cache keys on the three tensors'
// identities, data pointers and version counters: an in-place change or a new tensor builds a new
// layout; entries of freed tensors are dropped.
std::shared_ptr<const SegmentLayout> csr_segments(const at::Tensor& values_src, const at::Tensor& crow_src,
                                                  const at::Tensor& col_src, const CsrWeight& w, int64_t N,
                                                  int64_t K, int64_t span, int64_t rows, CsrIndexFn index,
                                                  int* status);

// The 2:4 check of an ISA unit (spmm.h's semi24_check) over rows [r0, r1).
using Semi24CheckFn = int (*)(const Problem&, const Semi24Weight&, int64_t, int64_t);

// The same layout for a 2:4 weight `w` [N, K] (float32 values [N, K/2], int16 meta; values_src,
// meta_src: the tensors passed to the op): its pattern read as csr (two stored weights per group
// of four columns), so every row holds span/2 weights in each full sub-block and every segment
// runs in pairs. Null in the same cases as csr_segments; on a cache miss `check` first passes
// every row of meta, else *status = kBadMeta and null. Cached on values and meta as above.
std::shared_ptr<const SegmentLayout> semi24_segments(const at::Tensor& values_src, const at::Tensor& meta_src,
                                                     const Semi24Weight& w, int64_t N, int64_t K, int64_t span,
                                                     int64_t rows, Semi24CheckFn check, CsrIndexFn index,
                                                     int* status);

// The bsr check of an ISA unit (spmm.h's bsr_index) over block rows [b0, b1).
using BsrIndexFn = int (*)(const Problem&, const BsrWeight&, int64_t, int64_t, int64_t*);

// The same layout for a bsr weight `w` [N, K] with blocks of fewer than 4 rows (float32 values
// [nblocks, bm, bk]; values_src, crow_src, col_src: the tensors passed to the op), read as csr:
// every stored value of a block (its zeros too) is a stored weight of its row, columns past K
// dropped. Blocks of 4 rows and more run the bsr kernel's four-row pass instead (one loaded Xᵀ
// vector feeds four FMAs). Null in the same cases as csr_segments; on a cache miss `check`
// first passes every block row (block columns, padding past K), else *status is its code and null.
std::shared_ptr<const SegmentLayout> bsr_segments(const at::Tensor& values_src, const at::Tensor& crow_src,
                                                  const at::Tensor& col_src, const BsrWeight& w, int64_t N,
                                                  int64_t K, int64_t span, int64_t rows, BsrIndexFn check,
                                                  CsrIndexFn index, int* status);

// Layouts now cached (tests).
int64_t segment_cache_size();

// Drops every cached layout (after a weight was changed behind its version counter: through
// `.data`, a NumPy view or a raw pointer).
void clear_segment_cache();

}  // namespace cpu
}  // namespace sparse_prune
