// Dispatch over the (dtype, tile) translation units, and the host-side CuTe evaluation of the
// compressed-A and metadata layouts (no kernel is instantiated here; host code only).
#include "semi24_sm90_kernel.cuh"

#include <vector>

namespace sparse_prune::sm90 {

#define SPARSE_PRUNE_SM90_DECLARE(NAME)                  \
  int64_t NAME##_workspace(const GemmArgs& g);           \
  const char* NAME##_run(const GemmArgs& g, void* ws, cudaStream_t s);

SPARSE_PRUNE_SM90_DECLARE(f16_128x128)
SPARSE_PRUNE_SM90_DECLARE(f16_128x64)
SPARSE_PRUNE_SM90_DECLARE(bf16_128x128)
SPARSE_PRUNE_SM90_DECLARE(bf16_128x64)

namespace {

using WorkspaceFn = int64_t (*)(const GemmArgs&);
using RunFn = const char* (*)(const GemmArgs&, void*, cudaStream_t);

bool lookup(int dtype, int tile, WorkspaceFn* ws, RunFn* run) {
  if (dtype == kFloat16 && tile == kTile128x128) { *ws = f16_128x128_workspace; *run = f16_128x128_run; }
  else if (dtype == kFloat16 && tile == kTile128x64) { *ws = f16_128x64_workspace; *run = f16_128x64_run; }
  else if (dtype == kBFloat16 && tile == kTile128x128) { *ws = bf16_128x128_workspace; *run = bf16_128x128_run; }
  else if (dtype == kBFloat16 && tile == kTile128x64) { *ws = bf16_128x64_workspace; *run = bf16_128x64_run; }
  else return false;
  return true;
}

}  // namespace

int64_t workspace_size(int dtype, int tile, const GemmArgs& args) {
  WorkspaceFn ws;
  RunFn run;
  if (!lookup(dtype, tile, &ws, &run)) return -1;
  return ws(args);
}

const char* run(int dtype, int tile, const GemmArgs& args, void* workspace, cudaStream_t stream) {
  WorkspaceFn ws;
  RunFn fn;
  if (!lookup(dtype, tile, &ws, &fn)) return "unknown dtype or tile config";
  return fn(args, workspace, stream);
}

#if defined(SPARSE_PRUNE_SM90_COMPILED)

bool compiled() { return true; }

void e_shape(int m, int k, int64_t* rows, int64_t* cols) {
  using SC = CanonicalSparseConfig;
  *rows = cutlass::round_up(m, int(typename SC::TensorEAlignmentM{}));
  *cols = cutlass::round_up(k, int(typename SC::TensorEAlignmentK{})) /
          int(typename SC::ElementEMmaSparsity{});
}

// Addresses exactly as cutlass::transform::kernel::SM90StructuredSparseCompressor computes
// them: typed sparse pointers over fill_layoutA/fill_layoutE, recast to raw storage units.
void layout_offsets(int m, int k, int64_t* a_off, int64_t* e_off) {
  using namespace cute;
  using SC = CanonicalSparseConfig;
  using ElementAUint = cute::uint_bit_t<16>;
  using ElementAUintCompressed = cute::sparse_elem<typename SC::ElementASparsity{}, ElementAUint>;
  using ElementEMma = typename SC::ElementEMma;
  using ElementEMmaRaw = typename SC::ElementEMmaRaw;
  const auto problem = make_shape(m, 1, k, 1);
  const auto layout_a = SC::fill_layoutA(problem);
  const auto layout_e = SC::fill_layoutE(problem);
  int64_t e_rows, e_cols;
  e_shape(m, k, &e_rows, &e_cols);
  const int64_t k_a = cutlass::round_up(k, int(typename SC::TensorAAlignmentK{}));
  std::vector<ElementAUint> abuf(static_cast<size_t>(m) * k_a / 2 + 1);
  std::vector<ElementEMmaRaw> ebuf(static_cast<size_t>(e_rows * e_cols) + 1);

  Tensor gAC_sparse = make_tensor(make_gmem_ptr(recast_ptr<ElementAUintCompressed>(abuf.data())), layout_a);
  Tensor gAC = recast<ElementAUint>(gAC_sparse);
  Tensor gE_sparse = make_tensor(make_gmem_ptr(recast_ptr<ElementEMma>(ebuf.data())), layout_e);
  Tensor gE = recast<ElementEMmaRaw>(gE_sparse);
  const int64_t a_cols = k / 2, e_bytes = k / 8;
  for (int r = 0; r < m; ++r) {
    for (int64_t c = 0; c < a_cols; ++c)
      a_off[r * a_cols + c] = &gAC(r, static_cast<int>(c), 0) - abuf.data();
    for (int64_t b = 0; b < e_bytes; ++b)
      e_off[r * e_bytes + b] = &gE(r, static_cast<int>(b), 0) - ebuf.data();
  }
}

#else

bool compiled() { return false; }
void e_shape(int, int, int64_t* rows, int64_t* cols) { *rows = *cols = 0; }
void layout_offsets(int, int, int64_t*, int64_t*) {}

#endif

}  // namespace sparse_prune::sm90
