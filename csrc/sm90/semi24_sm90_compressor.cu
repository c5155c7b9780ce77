// CUTLASS's own sm90 structured-sparse compressor (dense 2:4 weight -> compressed A + E), as a
// test oracle for semi24_sm90_pack: on a GPU the tests compare the two byte for byte. Never
// used on the inference path (our packer derives E from SemiStructured.meta instead).
#include "semi24_sm90_kernel.cuh"

#if defined(SPARSE_PRUNE_SM90_COMPILED)
#include "cutlass/transform/device/transform_universal_adapter.hpp"
#include "cutlass/transform/kernel/sparse_gemm_compressor.hpp"
#endif

namespace sparse_prune::sm90 {

#if defined(SPARSE_PRUNE_SM90_COMPILED)

namespace {

using CompressorKernel = cutlass::transform::kernel::StructuredSparseCompressor<
    cute::Shape<int, int, int, int>, cutlass::half_t, cutlass::layout::RowMajor,
    CanonicalSparseConfig, cutlass::arch::Sm90>;
using Compressor = cutlass::transform::device::TransformUniversalAdapter<CompressorKernel>;

Compressor::Arguments compressor_args(const CompressArgs& c) {
  using StrideA = cutlass::gemm::TagToStrideA_t<cutlass::layout::RowMajor>;
  const StrideA stride_a = cutlass::make_cute_packed_stride(StrideA{}, cute::make_shape(c.m, c.k, 1));
  cutlass::KernelHardwareInfo hw;
  hw.device_id = c.device;
  hw.sm_count = c.sm_count;
  return Compressor::Arguments{cute::make_shape(c.m, 1, c.k, 1), {c.dense, stride_a, c.a, c.e}, hw};
}

}  // namespace

int64_t compress_workspace_size(const CompressArgs& c) {
  const auto args = compressor_args(c);
  if (Compressor::can_implement(args) != cutlass::Status::kSuccess) return -1;
  return static_cast<int64_t>(Compressor::get_workspace_size(args));
}

const char* compress(const CompressArgs& c, void* workspace, cudaStream_t stream) {
  const auto args = compressor_args(c);
  Compressor op;
  if (op.can_implement(args) != cutlass::Status::kSuccess) return "CUTLASS compressor refused the problem";
  if (op.initialize(args, workspace, stream) != cutlass::Status::kSuccess)
    return "CUTLASS compressor initialize failed";
  if (op.run(stream) != cutlass::Status::kSuccess) return "CUTLASS compressor launch failed";
  return nullptr;
}

#else

int64_t compress_workspace_size(const CompressArgs&) { return -1; }
const char* compress(const CompressArgs&, void*, cudaStream_t) {
  return "built without CUTLASS_ARCH_MMA_SPARSE_SM90_SUPPORTED";
}

#endif

}  // namespace sparse_prune::sm90
