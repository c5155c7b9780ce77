// One (dtype, tile) of the sm90 2:4 GEMM: both epilogues (bias or none, bias or none + GELU).
// Its own translation unit so the build runs them in parallel (semi24_sm90_kernel.cuh).
#include "semi24_sm90_kernel.cuh"

namespace sparse_prune::sm90 {
SPARSE_PRUNE_SM90_DEFINE(f16_128x64, cutlass::half_t, Tile128x64, Cluster128x64)
}  // namespace sparse_prune::sm90
