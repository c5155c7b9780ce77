// CUTLASS 3.x/4.x sm90a 2:4 sparse GEMM (wgmma.sp, TMA, warp-specialized persistent kernel)
// behind semi24_sm90.h. Included by one .cu per (dtype, tile) so the build parallelises.
//
// Y [tokens, N] = X [tokens, K] · Wᵀ (+ bias) (GELU) is computed as the column-major GEMM
//   D [N, tokens] = A [N, K] · B [K, tokens]
// with A = W, the structured-sparse operand (CUTLASS only sparsifies A), row-major = K-major,
// and B = Xᵀ, "column-major" = K-major, which is X exactly as stored. D column-major with
// leading dimension ldy is Y row-major: no transposed copy of X or Y anywhere.
// The bias is per row of D (per output feature): LinCombPerRowBias (a column broadcast).
#pragma once

#include "semi24_sm90.h"

#include "cutlass/cutlass.h"

#include "cute/tensor.hpp"
#include "cutlass/epilogue/collective/collective_builder.hpp"
#include "cutlass/epilogue/fusion/operations.hpp"
#include "cutlass/epilogue/thread/activation.h"
#include "cutlass/gemm/collective/collective_builder.hpp"
#include "cutlass/gemm/device/gemm_universal_adapter.h"
#include "cutlass/gemm/dispatch_policy.hpp"
#include "cutlass/gemm/kernel/gemm_universal.hpp"
#include "cutlass/kernel_hardware_info.h"
#include "cutlass/util/packed_stride.hpp"

#include <type_traits>

namespace sparse_prune::sm90 {

#if defined(CUTLASS_ARCH_MMA_SPARSE_SM90_SUPPORTED)
#define SPARSE_PRUNE_SM90_COMPILED 1

template <class Element, class TileShape, class ClusterShape, bool Gelu>
struct Semi24Gemm {
  using ElementA = Element;
  using LayoutTagA = cutlass::layout::RowMajor;  // W [N, K]: K-major
  using ElementB = Element;
  using LayoutTagB = cutlass::layout::ColumnMajor;  // B [K, tokens] = X [tokens, K]: K-major
  using ElementD = Element;
  using LayoutTagD = cutlass::layout::ColumnMajor;  // D [N, tokens] = Y [tokens, N] row-major
  using ElementC = void;                             // no source tensor (beta = 0)
  using ElementAcc = float;
  using ElementCompute = float;
  static constexpr int kAlign = 128 / cutlass::sizeof_bits<Element>::value;  // 16 bytes: TMA
  // Bias read element by element (predicated): any N and any bias offset are fine.
  static constexpr int kAlignBias = 1;

  using Fusion = std::conditional_t<
      Gelu,
      cutlass::epilogue::fusion::LinCombPerRowBiasEltAct<
          cutlass::epilogue::thread::GELU, ElementD, ElementCompute, Element, ElementD,
          ElementCompute, kAlignBias>,
      cutlass::epilogue::fusion::LinCombPerRowBias<ElementD, ElementCompute, Element, ElementD,
                                                   ElementCompute, kAlignBias>>;

  using CollectiveEpilogue = typename cutlass::epilogue::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, TileShape, ClusterShape,
      cutlass::epilogue::collective::EpilogueTileAuto, ElementAcc, ElementCompute, ElementC,
      LayoutTagD, kAlign, ElementD, LayoutTagD, kAlign,
      cutlass::epilogue::TmaWarpSpecializedCooperative, Fusion>::CollectiveOp;

  using CollectiveMainloop = typename cutlass::gemm::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassSparseTensorOp, ElementA, LayoutTagA, kAlign,
      ElementB, LayoutTagB, kAlign, ElementAcc, TileShape, ClusterShape,
      cutlass::gemm::collective::StageCountAutoCarveout<static_cast<int>(
          sizeof(typename CollectiveEpilogue::SharedStorage))>,
      cutlass::gemm::KernelTmaWarpSpecializedCooperative>::CollectiveOp;

  using Kernel = cutlass::gemm::kernel::GemmUniversal<cute::Shape<int, int, int, int>,
                                                      CollectiveMainloop, CollectiveEpilogue>;
  using Gemm = cutlass::gemm::device::GemmUniversalAdapter<Kernel>;
  using SparseConfig = typename CollectiveMainloop::SparseConfig;
  using StrideB = typename Kernel::StrideB;
  using StrideD = typename Kernel::StrideD;
  using ElementE = typename CollectiveMainloop::ElementE;

  static typename Gemm::Arguments arguments(const GemmArgs& g) {
    const auto problem = cute::make_shape(g.n, g.tokens, g.k, 1);
    const StrideB stride_b = cutlass::make_cute_packed_stride(StrideB{}, cute::make_shape(g.tokens, g.k, 1));
    // Column-major D with leading dimension ldy: a packed (ldy, tokens) stride.
    const StrideD stride_d = cutlass::make_cute_packed_stride(
        StrideD{}, cute::make_shape(static_cast<int>(g.ldy), g.tokens, 1));
    cutlass::KernelHardwareInfo hw;
    hw.device_id = g.device;
    hw.sm_count = g.sm_count;
    typename Gemm::Arguments args{
        cutlass::gemm::GemmUniversalMode::kGemm,
        problem,
        {static_cast<const ElementA*>(g.a), SparseConfig::fill_layoutA(problem),
         static_cast<const ElementB*>(g.x), stride_b, static_cast<const ElementE*>(g.e),
         SparseConfig::fill_layoutE(problem)},
        {{}, nullptr, stride_d, static_cast<ElementD*>(g.y), stride_d},
        hw};
    args.epilogue.thread.alpha = 1.f;
    args.epilogue.thread.beta = 0.f;
    args.epilogue.thread.bias_ptr = static_cast<const Element*>(g.bias);  // nullptr: no bias
    return args;
  }

  static int64_t workspace_size(const GemmArgs& g) {
    const auto args = arguments(g);
    if (Gemm::can_implement(args) != cutlass::Status::kSuccess) return -1;
    return static_cast<int64_t>(Gemm::get_workspace_size(args));
  }

  static const char* run(const GemmArgs& g, void* workspace, cudaStream_t stream) {
    const auto args = arguments(g);
    Gemm gemm;
    if (gemm.can_implement(args) != cutlass::Status::kSuccess)
      return "CUTLASS can_implement refused the problem (alignment or layout)";
    if (gemm.initialize(args, workspace, stream) != cutlass::Status::kSuccess)
      return "CUTLASS initialize failed";
    if (gemm.run(stream) != cutlass::Status::kSuccess) return "CUTLASS kernel launch failed";
    return nullptr;
  }
};

using Tile128x128 = cute::Shape<cute::_128, cute::_128, cute::_128>;
using Cluster128x128 = cute::Shape<cute::_1, cute::_2, cute::_1>;
using Tile128x64 = cute::Shape<cute::_128, cute::_64, cute::_128>;
using Cluster128x64 = cute::Shape<cute::_1, cute::_1, cute::_1>;

// The one metadata layout every config must share (TileK = 128 -> MinTileShapeK = 128): the
// layout that semi24_sm90_pack writes. Checked at compile time in every translation unit.
using CanonicalSparseConfig =
    typename Semi24Gemm<cutlass::half_t, Tile128x128, Cluster128x128, false>::SparseConfig;

// Compared at namespace scope on concrete types (gcc 12 rejects the builder's dependent
// types inside a constexpr function template).
#define SPARSE_PRUNE_SM90_CHECK_LAYOUT(G)                                                        \
  static_assert(std::is_same_v<G::SparseConfig::TensorEAtom, CanonicalSparseConfig::TensorEAtom> && \
                    std::is_same_v<G::SparseConfig::ElementEMma, CanonicalSparseConfig::ElementEMma> && \
                    G::SparseConfig::TensorAAlignmentK::value ==                                 \
                        CanonicalSparseConfig::TensorAAlignmentK::value &&                       \
                    G::SparseConfig::TensorAAlignmentM::value ==                                 \
                        CanonicalSparseConfig::TensorAAlignmentM::value,                         \
                "every sm90 tile config must share the metadata layout of semi24_sm90_pack")

// Entry points of one (dtype, tile) translation unit, both epilogues.
#define SPARSE_PRUNE_SM90_DEFINE(NAME, ELEMENT, TILE, CLUSTER)                                  \
  using NAME##_plain = Semi24Gemm<ELEMENT, TILE, CLUSTER, false>;                              \
  using NAME##_gelu = Semi24Gemm<ELEMENT, TILE, CLUSTER, true>;                                \
  SPARSE_PRUNE_SM90_CHECK_LAYOUT(NAME##_plain);                                                \
  SPARSE_PRUNE_SM90_CHECK_LAYOUT(NAME##_gelu);                                                 \
  int64_t NAME##_workspace(const GemmArgs& g) {                                                \
    return g.gelu ? NAME##_gelu::workspace_size(g) : NAME##_plain::workspace_size(g);           \
  }                                                                                            \
  const char* NAME##_run(const GemmArgs& g, void* ws, cudaStream_t s) {                        \
    return g.gelu ? NAME##_gelu::run(g, ws, s) : NAME##_plain::run(g, ws, s);                   \
  }

#else  // toolkit without CUTLASS's sm90 sparse GEMM: entry points that refuse

#define SPARSE_PRUNE_SM90_DEFINE(NAME, ELEMENT, TILE, CLUSTER)                   \
  int64_t NAME##_workspace(const GemmArgs&) { return -1; }                      \
  const char* NAME##_run(const GemmArgs&, void*, cudaStream_t) {                \
    return "built without CUTLASS_ARCH_MMA_SPARSE_SM90_SUPPORTED (CUDA >= 12.2 needed)"; \
  }

#endif

}  // namespace sparse_prune::sm90
