// Interface between the CUTLASS translation units (semi24_sm90_*.cu, no torch headers) and the
// torch-facing registration (semi24_sm90_ops.cpp, no CUTLASS headers). Plain C++ only.
#pragma once

#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

namespace sparse_prune::sm90 {

enum Dtype : int { kFloat16 = 0, kBFloat16 = 1 };

// Tile configs (all share TileK = 128, hence one metadata layout; see semi24_sm90_kernel.cuh).
enum Tile : int {
  kTile128x128 = 0,  // 128 (out features) x 128 (tokens) x 128, cluster 1x2x1: large M
  kTile128x64 = 1,   // 128 x 64 x 128, cluster 1x1x1: small M (fewer tokens than one wave)
  kNumTiles = 2,
};

// Y [tokens, ldy] (row-major; columns >= n untouched) = X [tokens, k] · Wᵀ (+ bias) (GELU),
// computed as the CUTLASS GEMM D [n, tokens] (column-major, ld = ldy) = A [n, k] · B [k, tokens]
// with A = W (2:4 sparse, compressed values [n, k/2] + metadata E) and B = Xᵀ (X as stored).
struct GemmArgs {
  const void* x = nullptr;     // [tokens, k] row-major, 16-byte aligned
  const void* a = nullptr;     // [n, k/2] row-major (our SemiStructured values)
  const void* e = nullptr;     // metadata bytes in CUTLASS's sm90 E layout (semi24_sm90_pack)
  const void* bias = nullptr;  // [n] or nullptr
  void* y = nullptr;           // [tokens, ldy], ldy % 8 == 0, ldy >= n
  int n = 0;  // GEMM rows: out features rounded up to 8 (A has that many rows)
  int tokens = 0;
  int k = 0;
  int64_t ldy = 0;
  int sm_count = 0;
  int device = 0;
  bool gelu = false;
};

// True when this library was compiled with CUTLASS's sm90 sparse GEMM (toolkit >= 12.2).
bool compiled();

// Workspace bytes the kernel needs (allocate them with torch's allocator), or a negative
// value when the config cannot run the problem.
int64_t workspace_size(int dtype, int tile, const GemmArgs& args);

// Launch on `stream`. Returns nullptr on success, else a static message.
const char* run(int dtype, int tile, const GemmArgs& args, void* workspace, cudaStream_t stream);

// Host-only CuTe evaluation of the layouts the kernels use, for the layout tests:
// a_off[r * (k/2) + c] = element offset of compressed A (row r, stored value c);
// e_off[r * (k/8) + b] = byte offset of metadata byte b (groups 2b, 2b+1) of row r;
// both for rows < m, as the CUTLASS sm90 compressor addresses them. Sizes from e_shape.
void layout_offsets(int m, int k, int64_t* a_off, int64_t* e_off);
// CUTLASS's own sm90 compressor (test oracle for semi24_sm90_pack): dense row-major [m, k]
// 16-bit weight -> compressed A [m, k/2] and E (e_shape). Both outputs must be zeroed first.
struct CompressArgs {
  const void* dense = nullptr;
  void* a = nullptr;
  void* e = nullptr;
  int m = 0;
  int k = 0;
  int device = 0;
  int sm_count = 0;
};
int64_t compress_workspace_size(const CompressArgs& args);
const char* compress(const CompressArgs& args, void* workspace, cudaStream_t stream);

// Metadata tensor shape (rows, bytes per row) for an [m, k] weight.
void e_shape(int m, int k, int64_t* rows, int64_t* cols);

}  // namespace sparse_prune::sm90
