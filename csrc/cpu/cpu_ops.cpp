// sparse_prune._C_cpu: the CPU kernels of the public linear ops (schemas in sparse_prune/ops.py)
//   csr_linear, bsr_linear, semi24_linear : Y [M, N] = X [M, K] · Wᵀ (+ bias) (GELU if gelu)
//   sparse_mlp : fc2(GELU(fc1(X))) of any two of those formats, the hidden layer kept transposed
// This unit owns everything torch: argument checks (ValueError/TypeError naming the argument),
// dtypes (float32 natively; float64 on the portable path; float16/bfloat16 computed in float32),
// threads (at::parallel_for, so torch.set_num_threads holds; rows split by nonzeros), and the
// choice of ISA: AVX2+FMA where the CPU has it (runtime check), the portable path elsewhere or
// when SPARSE_PRUNE_CPU_ISA=portable.
#include <Python.h>
#include <torch/library.h>

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <string>
#include <vector>

#include "cpu_ops.h"
#include "segments.h"
#include "spmm.h"

namespace sparse_prune {
namespace cpu {
namespace {

bool cpu_has_avx2_fma() {
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
  static const bool has = [] {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  }();
  return has && avx2_f32::compiled();
#else
  return false;
#endif
}

bool cpu_has_avx512f() {
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
  static const bool has = [] {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512f") != 0;
  }();
  return has && cpu_has_avx2_fma() && avx512_f32::compiled();
#else
  return false;
#endif
}

// "avx512", "avx2" or "portable": what float32 runs on now, the widest the CPU has unless
// SPARSE_PRUNE_CPU_ISA names another (tests run each); asking for an ISA the CPU lacks is an
// error, never a SIGILL.
std::string float_isa() {
  const char* env = std::getenv("SPARSE_PRUNE_CPU_ISA");
  const std::string want = env ? env : "";
  TORCH_CHECK_VALUE(want.empty() || want == "auto" || want == "avx512" || want == "avx2" || want == "portable",
                    "SPARSE_PRUNE_CPU_ISA must be one of auto, avx512, avx2, portable; got '", want, "'");
  if (want == "portable") return "portable";
  if (want == "avx512") {
    TORCH_CHECK_VALUE(cpu_has_avx512f(), "SPARSE_PRUNE_CPU_ISA=avx512 but this CPU (or build) has no AVX-512F");
    return "avx512";
  }
  if (want == "avx2") {
    TORCH_CHECK_VALUE(cpu_has_avx2_fma(), "SPARSE_PRUNE_CPU_ISA=avx2 but this CPU (or build) has no AVX2+FMA");
    return "avx2";
  }
  return cpu_has_avx512f() ? "avx512" : cpu_has_avx2_fma() ? "avx2" : "portable";
}

int64_t env_int(const char* name, int64_t fallback) {
  const char* env = std::getenv(name);
  if (!env || !*env) return fallback;
  char* end = nullptr;
  const long long v = std::strtoll(env, &end, 10);
  TORCH_CHECK_VALUE(end && *end == '\0' && v > 0, name, " must be a positive integer, got '", env, "'");
  return v;
}

// Token tiles for an ISA with `lanes`-float vectors and at most `max_tile` tokens per tile:
// as few tiles as that allows, balanced (M = 197 -> 5 x 40 for AVX2, 2 x 112 for AVX-512), so
// no narrow last tile pays the per-weight cost of a full one for a few tokens.
Problem plan(int64_t M, int64_t N, int64_t K, int64_t block_cols, int64_t lanes, int64_t max_tile,
             double stored_per_row, double segment, const at::Tensor& bias, bool gelu) {
  Problem p;
  p.M = M;
  p.N = N;
  p.K = K;
  p.bias = bias.defined() ? bias.data_ptr() : nullptr;
  p.gelu = gelu;
  max_tile = std::min<int64_t>(max_tile, env_int("SPARSE_PRUNE_CPU_TILE", max_tile) / lanes * lanes);
  TORCH_CHECK_VALUE(max_tile >= lanes, "SPARSE_PRUNE_CPU_TILE must be at least ", lanes, " here");
  const auto round_up = [lanes](int64_t v) { return std::max<int64_t>(lanes, (v + lanes - 1) / lanes * lanes); };
  const int64_t tiles = std::max<int64_t>(1, (M + max_tile - 1) / max_tile);
  p.tile = round_up((M + tiles - 1) / tiles);
  p.ntiles = std::max<int64_t>(1, (M + p.tile - 1) / p.tile);
  p.last_tile = round_up(M - p.tile * (p.ntiles - 1));
  p.kp = (K + block_cols - 1) / block_cols * block_cols;
  // K-block: ~24 KiB of panel (L1 is 32 KiB on the CPUs we target), a multiple of 16 columns.
  // Sparse rows get wider K-blocks, so that a row's segment in a block holds ~`segment` stored
  // weights (48 for csr and 2:4, 96 for bsr: see the *_layer functions):
  // each segment costs an accumulator load/store, a mispredicted loop exit and, a whole row
  // away from the previous one in the CSR arrays, cache misses on its first values (software
  // prefetching them did not help, measured); against that, the L2 reads of a wider panel
  // slice are cheap. Measured on fc1/fc2 (M = 197, 2 threads): 90% csr ran 1.6x faster with
  // 480-column blocks than with L1-sized ones (and 96 per segment beat 48 by 6-8% at 90% before
  // the block bounds were counted: see csr_layer).
  const int64_t l1_cols = std::max<int64_t>(16, 24576 / (p.tile * 4) / 16 * 16);
  const double per_col = stored_per_row / std::max<int64_t>(1, K);
  segment = static_cast<double>(env_int("SPARSE_PRUNE_CPU_SEGMENT", static_cast<int64_t>(segment)));
  const int64_t sparse_cols = per_col > 0 ? static_cast<int64_t>(segment / per_col) : K;
  int64_t kb = env_int("SPARSE_PRUNE_CPU_KBLOCK", std::min<int64_t>(std::max<int64_t>(l1_cols, sparse_cols), std::max<int64_t>(K, 16)));
  kb = std::max<int64_t>(16, std::min<int64_t>(kb, std::max<int64_t>(K, 16)) / 16 * 16);
  if (block_cols > 1) kb = std::max<int64_t>(block_cols, kb / block_cols * block_cols);
  p.kblock = kb;
  // Row blocks of ~256 KiB of stored weight and panel groups of ~1 MiB: both stay in a 2 MiB L2
  // (Sapphire Rapids) or mostly in a 512 KiB L2 + L3 (Zen 3); measured below.
  p.weight_budget = env_int("SPARSE_PRUNE_CPU_WEIGHT_BYTES", 256 << 10);
  p.panel_budget = env_int("SPARSE_PRUNE_CPU_PANEL_BYTES", 1 << 20);
  return p;
}

void check_x(const char* op, const at::Tensor& x) {
  TORCH_CHECK_VALUE(x.device().is_cpu(), op, ": x must be a CPU tensor, got ", x.device());
  TORCH_CHECK_VALUE(x.dim() == 2, op, ": x must be 2-D [M, K], got shape ", x.sizes());
  const auto dt = x.scalar_type();
  TORCH_CHECK_TYPE(dt == at::kFloat || dt == at::kDouble || dt == at::kHalf || dt == at::kBFloat16, op,
                   ": x dtype must be float32, float64, float16 or bfloat16, got ", dt);
}

void check_same(const char* op, const char* name, const at::Tensor& t, const at::Tensor& x) {
  TORCH_CHECK_VALUE(t.device().is_cpu(), op, ": ", name, " must be a CPU tensor like x, got ", t.device());
  TORCH_CHECK_TYPE(t.scalar_type() == x.scalar_type(), op, ": ", name, " dtype ", t.scalar_type(),
                   " must match x's ", x.scalar_type());
}

const at::Tensor* check_bias(const char* op, const std::optional<at::Tensor>& bias, const at::Tensor& x,
                             int64_t N) {
  if (!bias.has_value() || !bias->defined()) return nullptr;
  check_same(op, "bias", *bias, x);
  TORCH_CHECK_VALUE(bias->dim() == 1 && bias->size(0) == N, op, ": bias must be [out_features = ", N,
                    "], got ", bias->sizes());
  return &*bias;
}

int index_bytes(const char* op, const char* name, const at::Tensor& t) {
  TORCH_CHECK_VALUE(t.device().is_cpu(), op, ": ", name, " must be a CPU tensor, got ", t.device());
  TORCH_CHECK_VALUE(t.dim() == 1, op, ": ", name, " must be 1-D, got shape ", t.sizes());
  switch (t.scalar_type()) {
    case at::kShort: return 2;
    case at::kInt: return 4;
    case at::kLong: return 8;
    default: TORCH_CHECK_TYPE(false, op, ": ", name, " dtype must be int16, int32 or int64, got ", t.scalar_type());
  }
  return 0;
}

// crow widened to int64 in a plain loop: `crow.to(at::kLong)` went through the dispatcher and
// a copy kernel on every call, ~18 us each, 1.8% of a 90%-csr ViT-B/16 forward (73 calls).
template <typename I>
void widen(const at::Tensor& crow, int64_t* out) {
  const I* src = crow.data_ptr<I>();
  for (int64_t i = 0; i < crow.size(0); ++i) out[i] = static_cast<int64_t>(src[i]);
}

// crow as contiguous int64, checked: [rows + 1], starts at 0, non-decreasing, ends at `stored`.
at::Tensor checked_crow(const char* op, const at::Tensor& crow, int64_t rows, int64_t stored) {
  const int ib = index_bytes(op, "crow_indices", crow);
  TORCH_CHECK_VALUE(crow.dim() == 1 && crow.size(0) == rows + 1, op, ": crow_indices must have ", rows + 1,
                    " entries, got shape ", crow.sizes());
  at::Tensor c = crow;
  if (ib != 8 || !crow.is_contiguous()) {
    c = at::empty({rows + 1}, crow.options().dtype(at::kLong));
    const at::Tensor src = crow.contiguous();
    if (ib == 2) widen<int16_t>(src, c.data_ptr<int64_t>());
    else if (ib == 4) widen<int32_t>(src, c.data_ptr<int64_t>());
    else widen<int64_t>(src, c.data_ptr<int64_t>());
  }
  const int64_t* p = c.data_ptr<int64_t>();
  TORCH_CHECK_VALUE(p[0] == 0, op, ": crow_indices must start at 0, got ", p[0]);
  for (int64_t r = 0; r < rows; ++r)
    TORCH_CHECK_VALUE(p[r + 1] >= p[r], op, ": crow_indices must be non-decreasing (entry ", r + 1, ")");
  TORCH_CHECK_VALUE(p[rows] == stored, op, ": crow_indices ends at ", p[rows], " but ", stored,
                    " entries are stored");
  return c;
}

void check_status(const char* op, const std::vector<int>& status, const char* what) {
  for (int s : status) {
    TORCH_CHECK_VALUE(s != kColOutOfRange, op, ": col_indices hold a ", what, " outside [0, in range)");
    TORCH_CHECK_VALUE(s != kColUnsorted, op, ": col_indices must be strictly increasing within each row");
    TORCH_CHECK_VALUE(s != kPaddingNonZero, op, ": values of the last block column must be 0 past K "
                      "(the padding of a block that overhangs the weight)");
    TORCH_CHECK_VALUE(s != kBadMeta, op, ": meta holds a group whose two column indices are not increasing "
                      "(valid nibbles: 4, 8, 9, 12, 13, 14; docs/semi_structured_layout.md)");
  }
}

// a * b * c, or a ValueError naming `what` when it overflows int64 (hostile shapes: a BSR block
// side of 2**60 on a zero-element values tensor).
int64_t checked_product(const char* op, const char* what, int64_t a, int64_t b, int64_t c = 1) {
  int64_t ab = 0, abc = 0;
  TORCH_CHECK_VALUE(!__builtin_mul_overflow(a, b, &ab) && !__builtin_mul_overflow(ab, c, &abc), op, ": ", what,
                    " is too large (", a, " x ", b, " x ", c, " overflows int64)");
  return abc;
}

// Split units [0, n) into `parts` contiguous ranges of about equal cost(u) = weight(u) + alpha,
// with cum(u) = Σ_{v<u} weight(v) read from a crow-like prefix array.
std::vector<int64_t> split(const int64_t* cum, int64_t n, int64_t alpha, int64_t parts) {
  std::vector<int64_t> cut(parts + 1, n);
  cut[0] = 0;
  const double total = static_cast<double>(cum[n]) + static_cast<double>(alpha) * n;
  for (int64_t i = 1; i < parts; ++i) {
    const double target = total * i / parts;
    int64_t lo = cut[i - 1], hi = n;
    while (lo < hi) {  // first u with cost(u) >= target
      const int64_t mid = (lo + hi) / 2;
      if (static_cast<double>(cum[mid]) + static_cast<double>(alpha) * mid < target) lo = mid + 1; else hi = mid;
    }
    cut[i] = lo;
  }
  return cut;
}

int64_t worker_count(double flops) {
  // Below ~1 MFLOP a second thread costs more than it saves.
  return flops < 1e6 ? 1 : std::max<int64_t>(1, at::get_num_threads());
}

struct Isa {
  int64_t lanes, max_tile;
  void (*pack)(const Problem&, const void*, void*, int64_t, int64_t);
  int (*csr)(const Problem&, const CsrWeight&, const void*, int64_t, int64_t, void*, int64_t*, bool);
  int (*bsr)(const Problem&, const BsrWeight&, const void*, int64_t, int64_t, void*, int64_t*, bool);
  int (*semi)(const Problem&, const Semi24Weight&, const void*, int64_t, int64_t, void*, bool);
  int (*csr_index)(const Problem&, const CsrWeight&, int64_t, int64_t, int64_t*);
  int (*bsr_index)(const Problem&, const BsrWeight&, int64_t, int64_t, int64_t*);
  int (*semi_check)(const Problem&, const Semi24Weight&, int64_t, int64_t);
  void (*segs)(const Problem&, const CsrSegments&, const float*, int64_t, int64_t, float*);  // float32 only
};

template <typename T, int64_t Lanes, int64_t MaxTile, void (*P)(const Problem&, const T*, T*, int64_t, int64_t),
          int (*C)(const Problem&, const CsrWeight&, const T*, int64_t, int64_t, T*, int64_t*, bool),
          int (*B)(const Problem&, const BsrWeight&, const T*, int64_t, int64_t, T*, int64_t*, bool),
          int (*S)(const Problem&, const Semi24Weight&, const T*, int64_t, int64_t, T*, bool),
          int (*CI)(const Problem&, const CsrWeight&, int64_t, int64_t, int64_t*),
          int (*BI)(const Problem&, const BsrWeight&, int64_t, int64_t, int64_t*),
          int (*SC)(const Problem&, const Semi24Weight&, int64_t, int64_t),
          void (*SG)(const Problem&, const CsrSegments&, const float*, int64_t, int64_t, float*) = nullptr>
Isa make_isa() {
  return Isa{
      Lanes, MaxTile,
      [](const Problem& p, const void* x, void* xp, int64_t a, int64_t b) { P(p, static_cast<const T*>(x), static_cast<T*>(xp), a, b); },
      [](const Problem& p, const CsrWeight& w, const void* xp, int64_t a, int64_t b, void* yt, int64_t* bd, bool ix) {
        return C(p, w, static_cast<const T*>(xp), a, b, static_cast<T*>(yt), bd, ix); },
      [](const Problem& p, const BsrWeight& w, const void* xp, int64_t a, int64_t b, void* yt, int64_t* bd, bool ix) {
        return B(p, w, static_cast<const T*>(xp), a, b, static_cast<T*>(yt), bd, ix); },
      [](const Problem& p, const Semi24Weight& w, const void* xp, int64_t a, int64_t b, void* yt, bool ix) {
        return S(p, w, static_cast<const T*>(xp), a, b, static_cast<T*>(yt), ix); },
      CI, BI, SC, SG,
  };
}

Isa isa_for(at::ScalarType compute) {
  if (compute == at::kDouble)
    return make_isa<double, 8, 48, portable_f64::pack_x, portable_f64::csr_rows, portable_f64::bsr_rows,
                    portable_f64::semi24_rows, portable_f64::csr_index, portable_f64::bsr_index, portable_f64::semi24_check>();
  const std::string isa = float_isa();
  if (isa == "avx512")
    return make_isa<float, 16, 128, avx512_f32::pack_x, avx512_f32::csr_rows, avx512_f32::bsr_rows,
                    avx512_f32::semi24_rows, avx512_f32::csr_index, avx512_f32::bsr_index, avx512_f32::semi24_check,
                    avx512_f32::csr_segs>();
  if (isa == "avx2")
    return make_isa<float, 8, 48, avx2_f32::pack_x, avx2_f32::csr_rows, avx2_f32::bsr_rows, avx2_f32::semi24_rows, avx2_f32::csr_index, avx2_f32::bsr_index, avx2_f32::semi24_check,
                    avx2_f32::csr_segs>();
  return make_isa<float, 8, 48, portable_f32::pack_x, portable_f32::csr_rows, portable_f32::bsr_rows,
                  portable_f32::semi24_rows, portable_f32::csr_index, portable_f32::bsr_index, portable_f32::semi24_check,
                  portable_f32::csr_segs>();
}

// float16/bfloat16 are computed in float32 (no half FMA on these CPUs) and rounded once.
at::ScalarType compute_type(const at::Tensor& x) {
  return x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

at::Tensor as_compute(const at::Tensor& t, at::ScalarType ct) { return t.to(ct).contiguous(); }

// Scratch (panels, Yᵀ tiles, K-block bounds) reused across calls, one grow-only buffer per
// calling thread and slot: a fresh multi-MB allocation per call is an mmap plus first-touch
// page faults (measured: ~2 ms of 5 ms fixed cost on ViT-B/16 fc1 at M = 1576). Calls from
// several Python threads each get their own buffers.
at::Tensor scratch(int slot, int64_t numel, const at::TensorOptions& options) {
  thread_local at::Tensor buffers[8];
  const int index = slot * 2 + (options.dtype() == at::kDouble ? 1 : 0);
  at::Tensor& buf = buffers[index % 8];
  const auto dtype = options.dtype().toScalarType();
  if (!buf.defined() || buf.scalar_type() != dtype || buf.numel() < numel) {
    buf = at::empty({std::max<int64_t>(numel, 1)}, options);
  }
  return buf;
}

// Pack X into panels (parallel over tiles) and, unless the layer writes panels, allocate Y;
// returns (panels, y).
std::pair<at::Tensor, at::Tensor> prepare(const Isa& isa, Problem& p, const at::Tensor& xc, int64_t workers,
                                          bool alloc_y = true) {
  at::Tensor xp = scratch(0, checked_product("cpu kernel", "the packed input", p.ntiles, p.kp, p.tile), xc.options());
  at::Tensor y = alloc_y ? at::empty({p.M, p.N}, xc.options()) : at::Tensor();
  p.y = alloc_y ? y.data_ptr() : nullptr;
  const Problem& cp = p;
  const void* xd = xc.data_ptr();
  void* xpd = xp.data_ptr();
  if (workers > 1) {
    at::parallel_for(0, p.ntiles, 1, [&](int64_t a, int64_t b) { isa.pack(cp, xd, xpd, a, b); });
  } else {
    isa.pack(cp, xd, xpd, 0, p.ntiles);
  }
  return {xp, y};
}

at::Tensor finish(at::Tensor y, const at::Tensor& x) {
  return y.scalar_type() == x.scalar_type() ? y : y.to(x.scalar_type());
}

// fn(u0, u1) -> status for each worker's units [cut[i], cut[i+1]) (rows or block rows), on
// torch's threads when there is more than one worker; then the first bad status is raised.
template <class Fn>
void run_workers(const char* op, const std::vector<int64_t>& cut, const char* what, Fn fn) {
  const int64_t workers = static_cast<int64_t>(cut.size()) - 1;
  std::vector<int> status(workers, kOk);
  auto work = [&](int64_t a, int64_t e) {
    for (int64_t i = a; i < e; ++i)
      if (cut[i + 1] > cut[i]) status[i] = fn(cut[i], cut[i + 1]);
  };
  if (workers > 1) at::parallel_for(0, workers, 1, work); else work(0, workers);
  check_status(op, status, what);
}

// One sparse weight, checked and in the compute type, ready for plan() and run_layer(): the
// common part of the three linear ops and of each layer of sparse_mlp.
struct Layer {
  enum Kind { kCsr, kBsr, kSemi } kind = kCsr;
  int64_t N = 0, K = 0;
  int64_t block_cols = 1;         // bsr: the block width (panels of K rounded up to it)
  double stored_per_row = 0;      // stored weights per row (for the K-block)
  double flops_per_token = 0;     // 2 x stored weights (for the worker count)
  int64_t units = 0;              // rows (bsr: block rows) that workers split
  int64_t rows_per_unit = 1;      // bsr: bm
  std::vector<int64_t> cum;       // cost prefix over units (stored weights); csr: crow itself
  int64_t alpha_per_kblock = 0;   // per-unit fixed cost of each K-block segment, in weights
  double segment = 96;            // stored weights a row's K-block segment aims at (plan()); 0: L1 only
  at::Tensor vc, crow64, cc, mc, bc;  // kept alive for the kernels
  std::shared_ptr<const SegmentLayout> seg;  // csr and 2:4 on float32: the segment layout (csr_segs), or null
  CsrWeight csr;
  BsrWeight bsr;
  Semi24Weight semi;
};

// The segment layout's sub-block width: segment_span, or SPARSE_PRUNE_CPU_SPAN (a tuning knob:
// rounded down to a multiple of 16 within [16, 256]).
int64_t layout_span(double density, int64_t max_tile) {
  const int64_t span = env_int("SPARSE_PRUNE_CPU_SPAN", segment_span(density, max_tile));
  return std::max<int64_t>(16, std::min<int64_t>(256, span) / 16 * 16);
}

// Its rows per row block for N rows: segment_rows(N), or SPARSE_PRUNE_CPU_SEGMENT_ROWS (a tuning
// knob: at most 2^20).
int64_t layout_rows(int64_t N) {
  return std::min<int64_t>(1 << 20, env_int("SPARSE_PRUNE_CPU_SEGMENT_ROWS", segment_rows(N)));
}

Layer csr_layer(const char* op, const at::Tensor& x, int64_t K, at::ScalarType ct, const at::Tensor& values,
                const at::Tensor& crow, const at::Tensor& col, int64_t out_features,
                const std::optional<at::Tensor>& bias) {
  check_same(op, "values", values, x);
  TORCH_CHECK_VALUE(out_features >= 0, op, ": out_features must be >= 0, got ", out_features);
  TORCH_CHECK_VALUE(values.dim() == 1, op, ": values must be 1-D [nnz], got shape ", values.sizes());
  const int ib = index_bytes(op, "col_indices", col);
  TORCH_CHECK_VALUE(col.size(0) == values.size(0), op, ": values and col_indices must both hold nnz entries, got ",
                    values.size(0), " and ", col.size(0));
  const at::Tensor* b = check_bias(op, bias, x, out_features);
  Layer l;
  l.kind = Layer::kCsr;
  l.N = out_features;
  l.K = K;
  const int64_t nnz = values.size(0);
  l.crow64 = checked_crow(op, crow, l.N, nnz);
  l.vc = as_compute(values, ct);
  l.cc = col.contiguous();
  if (b) l.bc = as_compute(*b, ct);
  l.stored_per_row = l.N > 0 ? static_cast<double>(nnz) / l.N : 0;
  l.flops_per_token = 2.0 * nnz;
  l.units = l.N;
  const int64_t* c = l.crow64.data_ptr<int64_t>();
  l.alpha_per_kblock = 2;
  // 48 stored weights per K-block segment: measured on a quiet machine (2 threads, M = 197,
  // against 96): fc1 50% 1.21x vs 0.97x, 70% 1.83x vs 1.54x, 90% 4.11x vs 3.84x; fc2 50% 0.91x
  // vs 0.83x, 90% equal. (96 had won by 6-8% before the block bounds were counted instead of
  // binary-searched, which made a segment cheaper.)
  l.segment = 48;
  l.csr = CsrWeight{l.vc.data_ptr(), c, l.cc.data_ptr(), ib};
  const Isa isa = isa_for(ct);
  if (isa.segs && l.N > 0) {
    int status = kOk;
    const double density = l.K > 0 ? l.stored_per_row / static_cast<double>(l.K) : 1.0;
    l.seg = csr_segments(values, crow, col, l.csr, l.N, l.K, layout_span(density, isa.max_tile), layout_rows(l.N),
                         isa.csr_index,
                         &status);
    check_status(op, {status}, "column");
  }
  return l;
}

Layer bsr_layer(const char* op, const at::Tensor& x, int64_t K, at::ScalarType ct, const at::Tensor& values,
                const at::Tensor& crow, const at::Tensor& col, int64_t out_features,
                const std::optional<at::Tensor>& bias) {
  check_same(op, "values", values, x);
  TORCH_CHECK_VALUE(out_features >= 0, op, ": out_features must be >= 0, got ", out_features);
  TORCH_CHECK_VALUE(values.dim() == 3 && values.size(1) > 0 && values.size(2) > 0, op,
                    ": values must be 3-D [nblocks, bm, bk] with bm, bk >= 1, got shape ", values.sizes());
  const int ib = index_bytes(op, "col_indices", col);
  const int64_t bm = values.size(1), bk = values.size(2), nb = values.size(0);
  constexpr int64_t kMaxSide = 1 << 16;
  TORCH_CHECK_VALUE(bm <= kMaxSide && bk <= kMaxSide, op, ": block sides (values.shape[1:] = ", bm, " x ", bk,
                    ") must be at most ", kMaxSide);
  TORCH_CHECK_VALUE(col.size(0) == nb, op, ": col_indices must hold one entry per block (", nb, "), got ", col.size(0));
  const at::Tensor* b = check_bias(op, bias, x, out_features);
  Layer l;
  l.kind = Layer::kBsr;
  l.N = out_features;
  l.K = K;
  const int64_t nbr = (l.N + bm - 1) / bm;
  l.crow64 = checked_crow(op, crow, nbr, nb);
  l.vc = as_compute(values, ct);
  l.cc = col.contiguous();
  if (b) l.bc = as_compute(*b, ct);
  l.block_cols = bk;
  l.stored_per_row = nbr > 0 ? static_cast<double>(nb) * bk / nbr : 0;
  l.flops_per_token = 2.0 * nb * bm * bk;
  l.units = nbr;
  l.rows_per_unit = bm;
  // cost of a block row: its stored weights (crow counts blocks: scale by the block size)
  const int64_t* c = l.crow64.data_ptr<int64_t>();
  l.cum.resize(nbr + 1);
  for (int64_t i = 0; i <= nbr; ++i) l.cum[i] = c[i] * bm * bk;
  l.alpha_per_kblock = 2 * bm;
  l.bsr = BsrWeight{l.vc.data_ptr(), c, l.cc.data_ptr(), ib, bm, bk};
  const Isa isa = isa_for(ct);
  if (isa.segs && bm < 4 && l.N > 0 && l.K > 0) {
    // Blocks of 1-3 rows (1x4, 1x8) run as csr through the segment kernel (segments.h:
    // bsr_segments) instead of one row at a time over whole K-blocks: its L1-sized sub-blocks,
    // row pairs sharing each loaded Xᵀ vector (2xk: every column) and four weights per load.
    // Measured (Zen 4, one process, 41 paired rounds, M = 197): 1x4/1x8 at 90% 1.25-1.31x,
    // 70% 1.40-1.75x, 50% 1.65-2.02x; 2x8 90% 1.26-1.50x; M = 1576 1x4 90% 1.14x, 2x1 70% 1.70x.
    int status = kOk;
    const double density = l.stored_per_row / static_cast<double>(l.K);
    l.seg = bsr_segments(values, crow, col, l.bsr, l.N, l.K, layout_span(std::min(1.0, density), isa.max_tile),
                         layout_rows(l.N), isa.bsr_index, isa.csr_index, &status);
    check_status(op, {status}, "block column");
    if (l.seg) {
      l.segment = 48;
      l.alpha_per_kblock = 2;
    }
  }
  return l;
}

Layer semi_layer(const char* op, const at::Tensor& x, int64_t K, at::ScalarType ct, const at::Tensor& values,
                 const at::Tensor& meta, const std::optional<at::Tensor>& bias) {
  check_same(op, "values", values, x);
  TORCH_CHECK_VALUE(K % 4 == 0, op, ": K = ", K, " (x.shape[1]) must be a multiple of 4 for 2:4");
  TORCH_CHECK_VALUE(values.dim() == 2 && values.size(1) * 2 == K, op, ": values must be [N, K/2 = ", K / 2,
                    "], got shape ", values.sizes());
  const int64_t N = values.size(0);
  TORCH_CHECK_VALUE(meta.device().is_cpu(), op, ": meta must be a CPU tensor, got ", meta.device());
  TORCH_CHECK_TYPE(meta.scalar_type() == at::kShort, op, ": meta dtype must be int16, got ", meta.scalar_type());
  TORCH_CHECK_VALUE(meta.dim() == 2 && meta.size(0) == N && meta.size(1) == (K + 15) / 16, op,
                    ": meta must be [N, ceil(K/16)] = [", N, ", ", (K + 15) / 16, "], got shape ", meta.sizes());
  const at::Tensor* b = check_bias(op, bias, x, N);
  Layer l;
  l.kind = Layer::kSemi;
  l.N = N;
  l.K = K;
  l.vc = as_compute(values, ct);
  l.mc = meta.contiguous();
  if (b) l.bc = as_compute(*b, ct);
  l.stored_per_row = K / 2.0;
  l.flops_per_token = 1.0 * N * K;
  l.units = N;
  l.cum.resize(N + 1);
  for (int64_t i = 0; i <= N; ++i) l.cum[i] = i * (K / 2);
  l.alpha_per_kblock = 0;
  // 48-weight segments, as csr (see csr_layer); 96 ran 1.38x -> 1.28x (fc1) and 1.11x -> 0.92x
  // (fc2) on a quiet machine, L1-only blocks 1.28x and 1.04x.
  l.segment = 48;
  l.semi = Semi24Weight{l.vc.data_ptr(), l.mc.data_ptr<int16_t>(), l.mc.size(1)};
  const Isa isa = isa_for(ct);
  if (isa.segs && l.N > 0 && l.K > 0) {
    int status = kOk;
    l.seg = semi24_segments(values, meta, l.semi, l.N, l.K, layout_span(0.5, isa.max_tile), layout_rows(l.N),
                            isa.semi_check,
                            isa.csr_index, &status);
    check_status(op, {status}, "column");
  }
  return l;
}

Problem plan_layer(const Layer& l, int64_t M, const Isa& isa, bool gelu) {
  return plan(M, l.N, l.K, l.block_cols, isa.lanes, isa.max_tile, l.stored_per_row, l.segment, l.bc, gelu);
}

// Y (or, with p.y_panels set, the next layer's panels) of layer l from the panels xp, on
// `workers` workers splitting its units by stored weights; raises on a bad index.
void run_layer(const char* op, const Isa& isa, const Problem& p, const Layer& l, const void* xp, int64_t workers,
               const at::TensorOptions& options) {
  const int64_t nkb = (p.kp + p.kblock - 1) / p.kblock;
  const int64_t* cum = l.kind == Layer::kCsr ? l.crow64.data_ptr<int64_t>() : l.cum.data();
  const std::vector<int64_t> cut = split(cum, l.units, l.alpha_per_kblock * nkb, workers);
  at::Tensor yt = scratch(1, scratch_floats(p, l.N), options);  // bsr workers write rows < N only
  char* ytd = static_cast<char*>(yt.data_ptr());
  const int64_t es = yt.element_size();
  if (l.seg) {
    const CsrSegments& sv = l.seg->view;
    const std::vector<int64_t> blocks = split(l.seg->cum.data(), sv.nrb, 0, workers);
    run_workers(op, blocks, "column", [&](int64_t rb0, int64_t rb1) {
      isa.segs(p, sv, static_cast<const float*>(xp), rb0, rb1,
               reinterpret_cast<float*>(ytd) + scratch_floats(p, rb0 * sv.rows_per_block));
      return kOk;
    });
  } else if (l.kind == Layer::kCsr) {
    at::Tensor bounds = scratch(2, scratch_bounds(p, l.units), l.crow64.options());
    run_workers(op, cut, "column", [&](int64_t r0, int64_t r1) {
      return isa.csr(p, l.csr, xp, r0, r1, ytd + scratch_floats(p, r0) * es,
                     bounds.data_ptr<int64_t>() + scratch_bounds(p, r0), false);
    });
  } else if (l.kind == Layer::kBsr) {
    at::Tensor bounds = scratch(2, scratch_bounds(p, l.units), l.crow64.options());
    const int64_t bm = l.rows_per_unit;
    run_workers(op, cut, "block column", [&](int64_t b0, int64_t b1) {
      return isa.bsr(p, l.bsr, xp, b0, b1, ytd + scratch_floats(p, b0 * bm) * es,
                     bounds.data_ptr<int64_t>() + scratch_bounds(p, b0), false);
    });
  } else {
    run_workers(op, cut, "column", [&](int64_t r0, int64_t r1) {
      return isa.semi(p, l.semi, xp, r0, r1, ytd + scratch_floats(p, r0) * es, false);
    });
  }
}

// The index pass of units [u0, u1) of layer l for p.kblock: row u's bounds at
// bounds + u·bounds_stride(p).
int index_units(const Isa& isa, const Problem& p, const Layer& l, int64_t u0, int64_t u1, int64_t* bounds) {
  if (u1 <= u0 || l.seg) return kOk;  // a segment layout was checked when it was built
  if (l.kind == Layer::kCsr) return isa.csr_index(p, l.csr, u0, u1, bounds + u0 * bounds_stride(p));
  if (l.kind == Layer::kBsr) return isa.bsr_index(p, l.bsr, u0, u1, bounds + u0 * bounds_stride(p));
  return isa.semi_check(p, l.semi, u0, u1);
}

const char* index_what(const Layer& l) { return l.kind == Layer::kBsr ? "block column" : "column"; }

// The token split. Each worker takes a contiguous range of token tiles of the plan (token_pieces:
// the tiles on a cut shared by units) and runs the op on them alone: it packs its own panels,
// multiplies the rows of W of its pieces and writes its own rows of Y. Splitting rows instead
// made every worker read every panel and write a column slice of every row of Y: on each call
// the panels one core had written were pulled into the other's cache, and the next pack had to
// take the lines back. Measured on ViT-B/16 shapes (AVX-512, 2 threads, M = 197, bsr 4x1 90%,
// 768x768): packing one tile took 25-35 us against 7 us alone, and the layer ran only 1.28x
// faster on 2 threads than on 1. W is only read, and each core keeps its own copy. Every token
// is computed in the same tile, with the same K-blocks, as on one thread, so the result stays
// bitwise independent of the thread count. Used whenever every worker gets a tile;
// SPARSE_PRUNE_CPU_SPLIT = rows forces the row split (tokens or auto: the token split).
std::string split_mode() {
  const char* env = std::getenv("SPARSE_PRUNE_CPU_SPLIT");
  const std::string mode = env && *env ? env : "auto";
  TORCH_CHECK_VALUE(mode == "auto" || mode == "rows" || mode == "tokens",
                    "SPARSE_PRUNE_CPU_SPLIT must be one of auto, rows, tokens; got '", mode, "'");
  return mode;
}

// Tiles [t0, t1) of p as a problem of its own: same tiles and K-blocks, tokens counted from
// tile t0 (the caller shifts the pointers).
Problem tiles_of(const Problem& p, int64_t t0, int64_t t1) {
  Problem q = p;
  q.M = std::min(p.M, t1 * p.tile) - t0 * p.tile;
  q.ntiles = t1 - t0;
  q.last_tile = t1 == p.ntiles ? p.last_tile : p.tile;
  return q;
}

// The index pass of the layers `ls` (planned as ps) on `workers` threads, each taking a range of
// units of every layer split by stored weights; layer j's bounds at bounds[j]. Raises on a bad
// index before any product runs.
void index_layers(const char* op, const Isa& isa, const std::vector<const Layer*>& ls,
                  const std::vector<const Problem*>& ps, const std::vector<int64_t*>& bounds, int64_t workers) {
  if (std::all_of(ls.begin(), ls.end(), [](const Layer* l) { return l->seg != nullptr; }))
    return;  // segment layouts were checked when they were built: no threads to start
  std::vector<std::vector<int64_t>> cuts;
  for (const Layer* l : ls) {
    const int64_t* cum = l->kind == Layer::kCsr ? l->crow64.data_ptr<int64_t>() : l->cum.data();
    cuts.push_back(split(cum, l->units, 0, workers));
  }
  const int64_t nl = static_cast<int64_t>(ls.size());
  std::vector<int> status(workers * nl, kOk);
  at::parallel_for(0, workers, 1, [&](int64_t a, int64_t b) {
    for (int64_t i = a; i < b; ++i)
      for (int64_t j = 0; j < nl; ++j)
        status[i * nl + j] = index_units(isa, *ps[j], *ls[j], cuts[j][i], cuts[j][i + 1], bounds[j]);
  });
  for (int64_t j = 0; j < nl; ++j) {
    std::vector<int> sj;
    for (int64_t i = 0; i < workers; ++i) sj.push_back(status[i * nl + j]);
    check_status(op, sj, index_what(*ls[j]));
  }
}

// A worker's share of the token split: units [u0, u1) of tile t (a whole tile: 0, units).
struct Piece {
  int64_t t, u0, u1;
};

// The units a layer's workers split (segment layouts: row blocks) and their cost prefix.
int64_t split_units(const Layer& l) { return l.seg ? l.seg->view.nrb : l.units; }
const int64_t* unit_cost(const Layer& l) {
  if (l.seg) return l.seg->cum.data();
  return l.kind == Layer::kCsr ? l.crow64.data_ptr<int64_t>() : l.cum.data();
}

// linear_layer's token split at unit granularity: the tiles' work (vectors x stored weights)
// cut into `workers` even shares, a tile on a cut split between the two workers by units
// (rows, row blocks) at the cut's fraction of its stored weights. Whole tiles alone split 3:2
// on AVX2's 5 tiles at M = 197: measured on fc1 csr 50% and 90% (Zen 3, 2 threads), a token
// cost 20% more at M = 197 than at M = 160 (4 tiles, 2:2). Returns each worker's pieces, in
// tile order.
std::vector<std::vector<Piece>> token_pieces(const Problem& p, const Layer& l, int64_t workers, int64_t lanes) {
  const int64_t units = split_units(l);
  const int64_t* cost = unit_cost(l);
  std::vector<int64_t> cum(p.ntiles + 1, 0);
  for (int64_t t = 0; t < p.ntiles; ++t) cum[t + 1] = cum[t] + (t + 1 == p.ntiles ? p.last_tile : p.tile) / lanes;
  // cut i as (tile, first unit of the next worker in it); (ntiles, 0) at the end
  std::vector<std::pair<int64_t, int64_t>> cut(workers + 1, {p.ntiles, 0});
  cut[0] = {0, 0};
  for (int64_t i = 1; i < workers; ++i) {
    const double target = static_cast<double>(cum[p.ntiles]) * i / workers;
    int64_t t = 0;
    while (t + 1 < p.ntiles && cum[t + 1] <= target) ++t;
    const double frac = (target - cum[t]) / static_cast<double>(cum[t + 1] - cum[t]);
    const double want = frac * static_cast<double>(cost[units] - cost[0]) + static_cast<double>(cost[0]);
    int64_t u = 0;
    while (u < units && static_cast<double>(cost[u]) < want) ++u;
    // the nearer of the units on either side of the cut (the first at or past it took the next
    // unit whole: 3 of 4 blocks of a 768-row weight, measured 534 against 449 us per worker)
    if (u > 0 && want - static_cast<double>(cost[u - 1]) < static_cast<double>(cost[u]) - want) --u;
    cut[i] = u >= units ? std::make_pair(t + 1, int64_t{0}) : std::make_pair(t, u);
    if (cut[i] < cut[i - 1]) cut[i] = cut[i - 1];
  }
  std::vector<std::vector<Piece>> pieces(workers);
  for (int64_t i = 0; i < workers; ++i) {
    auto [ta, ua] = cut[i];
    const auto [tb, ub] = cut[i + 1];
    for (; ta < tb || (ta == tb && ua < ub); ++ta, ua = 0) {
      const int64_t u1 = ta == tb ? ub : units;
      if (u1 > ua) pieces[i].push_back(Piece{ta, ua, u1});
      if (ta == tb) break;
    }
  }
  return pieces;
}

// Units [u0, u1) of layer l over every tile of p on this thread (yt: its own Yᵀ scratch), the
// index pass done into bounds (index_units): cannot fail.
void unit_range(const Isa& isa, const Problem& p, const Layer& l, const void* xp, void* yt, const int64_t* bounds,
                int64_t u0, int64_t u1) {
  int64_t* b = const_cast<int64_t*>(bounds) + u0 * bounds_stride(p);  // read only: indexed
  if (l.seg) {
    isa.segs(p, l.seg->view, static_cast<const float*>(xp), u0, u1, static_cast<float*>(yt));
  } else if (l.kind == Layer::kCsr) {
    isa.csr(p, l.csr, xp, u0, u1, yt, b, true);
  } else if (l.kind == Layer::kBsr) {
    isa.bsr(p, l.bsr, xp, u0, u1, yt, b, true);
  } else {
    isa.semi(p, l.semi, xp, u0, u1, yt, true);
  }
}

// Worker i's share of a token split of layer l (planned as p): packs the tiles of its pieces
// from x (rows of l.K elements at xd) into panels of its own, at tile (first + i) of xpd (a tile
// on a cut is packed by both workers), then runs each piece on them, its one-tile problem's
// output set by set_output(q, tile). yt: the worker's Yᵀ scratch; bounds: the index pass's.
template <typename SetOutput>
void run_packed_pieces(const Isa& isa, const Problem& p, const Layer& l, const std::vector<Piece>& pieces,
                       int64_t i, const char* xd, char* xpd, int64_t tile_elems, int64_t es, void* yt,
                       const int64_t* bounds, const SetOutput& set_output) {
  if (pieces.empty()) return;
  const int64_t first = pieces.front().t, last = pieces.back().t + 1;
  char* panels = xpd + (first + i) * tile_elems * es;
  const Problem all = tiles_of(p, first, last);
  isa.pack(all, xd + first * p.tile * l.K * es, panels, 0, all.ntiles);
  for (const Piece& piece : pieces) {
    Problem q = tiles_of(p, piece.t, piece.t + 1);
    set_output(q, piece.t);
    unit_range(isa, q, l, panels + (piece.t - first) * tile_elems * es, yt, bounds, piece.u0, piece.u1);
  }
}

// linear_layer's token split: one index pass split by rows, then worker i packs the tiles of
// its pieces into panels of its own (a tile on a cut is packed by both workers) and multiplies
// their units. Every token is computed in the same tile with the same K-blocks as on one
// thread: the result is bitwise independent of the split.
at::Tensor linear_tokens(const char* op, const at::Tensor& xc, const Isa& isa, const Problem& p, const Layer& l,
                         const std::vector<std::vector<Piece>>& pieces) {
  const int64_t workers = static_cast<int64_t>(pieces.size());
  const int64_t es = xc.element_size();
  const int64_t tile_elems = checked_product(op, "the packed input", 1, p.kp, p.tile);
  at::Tensor xp = scratch(0, checked_product(op, "the packed input", p.ntiles + workers - 1, p.kp, p.tile),
                          xc.options());
  const int64_t yt_each = (scratch_floats(p, l.N) + 15) / 16 * 16;  // 64-byte aligned slices
  at::Tensor yt = scratch(1, checked_product(op, "the output tiles", workers, yt_each), xc.options());
  at::Tensor bounds = scratch(2, std::max<int64_t>(1, l.units * bounds_stride(p)), xc.options().dtype(at::kLong));
  int64_t* bd = bounds.data_ptr<int64_t>();
  index_layers(op, isa, {&l}, {&p}, {bd}, workers);
  at::Tensor y = at::empty({p.M, l.N}, xc.options());
  const char* xd = static_cast<const char*>(xc.data_ptr());
  char* xpd = static_cast<char*>(xp.data_ptr());
  char* ytd = static_cast<char*>(yt.data_ptr());
  char* yd = static_cast<char*>(y.data_ptr());
  at::parallel_for(0, workers, 1, [&](int64_t a, int64_t b) {
    for (int64_t i = a; i < b; ++i)
      run_packed_pieces(isa, p, l, pieces[i], i, xd, xpd, tile_elems, es, ytd + i * yt_each * es, bd,
                        [&](Problem& q, int64_t t) { q.y = yd + t * p.tile * l.N * es; });
  });
  return y;
}

// The single-layer ops: x [M, K] -> y [M, N].
at::Tensor linear_layer(const char* op, const at::Tensor& x, at::ScalarType ct, const Layer& l, bool gelu) {
  const int64_t M = x.size(0);
  if (M == 0 || l.N == 0) return at::empty({M, l.N}, x.options());
  const at::Tensor xc = as_compute(x, ct);
  const Isa isa = isa_for(ct);
  Problem p = plan_layer(l, M, isa, gelu);
  const int64_t workers = worker_count(l.flops_per_token * M);
  if (split_mode() != "rows" && workers > 1 && p.ntiles >= workers)
    return finish(linear_tokens(op, xc, isa, p, l, token_pieces(p, l, workers, isa.lanes)), x);
  auto [xp, y] = prepare(isa, p, xc, workers);
  run_layer(op, isa, p, l, xp.data_ptr(), workers, xc.options());
  return finish(y, x);
}

// A layer of sparse_mlp from its format name and arrays (csr/bsr: values, crow_indices,
// col_indices; 2:4: values, meta).
Layer mlp_layer(const char* op, const char* which, const at::Tensor& x, int64_t K, at::ScalarType ct,
                c10::string_view format, const std::vector<at::Tensor>& w, int64_t out_features,
                const std::optional<at::Tensor>& bias) {
  const bool csr = format == "csr", bsr = format == "bsr", semi = format == "2:4";
  TORCH_CHECK_VALUE(csr || bsr || semi, op, ": ", which, " format must be 'csr', 'bsr' or '2:4', got '",
                    std::string(format), "'");
  const size_t want = semi ? 2 : 3;
  TORCH_CHECK_VALUE(w.size() == want, op, ": ", which, " (", std::string(format), ") takes ", want,
                    " tensors, got ", w.size());
  if (semi) {
    Layer l = semi_layer(op, x, K, ct, w[0], w[1], bias);
    TORCH_CHECK_VALUE(l.N == out_features, op, ": ", which, " values hold ", l.N, " rows, expected ", out_features);
    return l;
  }
  return csr ? csr_layer(op, x, K, ct, w[0], w[1], w[2], out_features, bias)
             : bsr_layer(op, x, K, ct, w[0], w[1], w[2], out_features, bias);
}

}  // namespace

std::string current_float_isa() { return float_isa(); }

at::Tensor csr_linear_cpu(const at::Tensor& x, const at::Tensor& values, const at::Tensor& crow,
                          const at::Tensor& col, int64_t out_features, const std::optional<at::Tensor>& bias,
                          const std::optional<at::Tensor>& /*row_order: a GPU schedule*/, bool gelu) {
  const char* op = "csr_linear (CPU)";
  check_x(op, x);
  const at::ScalarType ct = compute_type(x);
  return linear_layer(op, x, ct, csr_layer(op, x, x.size(1), ct, values, crow, col, out_features, bias), gelu);
}

at::Tensor bsr_linear_cpu(const at::Tensor& x, const at::Tensor& values, const at::Tensor& crow,
                          const at::Tensor& col, int64_t out_features, const std::optional<at::Tensor>& bias,
                          bool gelu) {
  const char* op = "bsr_linear (CPU)";
  check_x(op, x);
  const at::ScalarType ct = compute_type(x);
  return linear_layer(op, x, ct, bsr_layer(op, x, x.size(1), ct, values, crow, col, out_features, bias), gelu);
}

at::Tensor semi24_linear_cpu(const at::Tensor& x, const at::Tensor& values, const at::Tensor& meta,
                             const std::optional<at::Tensor>& bias, bool gelu) {
  const char* op = "semi24_linear (CPU)";
  check_x(op, x);
  const at::ScalarType ct = compute_type(x);
  return linear_layer(op, x, ct, semi_layer(op, x, x.size(1), ct, values, meta, bias), gelu);
}

// fc2(act(fc1(x))) with the hidden activations kept transposed: fc1's epilogue writes bias +
// GELU straight into fc2's input panels (Yᵀ tiles are the layout a panel is), so the hidden
// [M, hidden] matrix is never transposed out and packed back in.
namespace {

// sparse_mlp's token split (see token_pieces): one index pass of both layers split by rows,
// then two passes. In the first, worker i packs the tiles of its fc1 pieces into panels of its
// own and runs them, fc1 writing the hidden panels of its units; in the second it runs its fc2
// pieces (cut by fc2's stored weights) on those panels. A tile on a cut has its hidden panel
// written by both workers: the only panel a core reads that the other wrote.
at::Tensor mlp_tokens(const char* op, const at::Tensor& xc, const Isa& isa, const Problem& p1, const Layer& l1,
                      const Problem& p2, const Layer& l2, int64_t workers) {
  const auto pieces1 = token_pieces(p1, l1, workers, isa.lanes), pieces2 = token_pieces(p2, l2, workers, isa.lanes);
  const int64_t hidden = l1.N;
  const int64_t es = xc.element_size();
  const int64_t tile1 = checked_product(op, "the packed input", 1, p1.kp, p1.tile);
  at::Tensor xp1 = scratch(0, checked_product(op, "the packed input", p1.ntiles + workers - 1, p1.kp, p1.tile),
                           xc.options());
  at::Tensor xp2 = scratch(3, checked_product(op, "the hidden panels", p2.ntiles, p2.kp, p2.tile), xc.options());
  const int64_t yt_each = (std::max(scratch_floats(p1, l1.N), scratch_floats(p2, l2.N)) + 15) / 16 * 16;
  at::Tensor yt = scratch(1, checked_product(op, "the output tiles", workers, yt_each), xc.options());
  const int64_t b1 = l1.units * bounds_stride(p1), b2 = l2.units * bounds_stride(p2);
  at::Tensor bounds = scratch(2, std::max<int64_t>(1, b1 + b2), xc.options().dtype(at::kLong));
  int64_t* bd1 = bounds.data_ptr<int64_t>();
  int64_t* bd2 = bd1 + b1;
  index_layers(op, isa, {&l1, &l2}, {&p1, &p2}, {bd1, bd2}, workers);
  at::Tensor y = at::empty({p2.M, l2.N}, xc.options());
  const char* xd = static_cast<const char*>(xc.data_ptr());
  char* p1d = static_cast<char*>(xp1.data_ptr());
  char* p2d = static_cast<char*>(xp2.data_ptr());
  char* ytd = static_cast<char*>(yt.data_ptr());
  char* yd = static_cast<char*>(y.data_ptr());
  // rows [hidden, kp2): the padding of a bsr block of fc2 that overhangs the hidden width
  for (int64_t t = 0; t < p2.ntiles && p2.kp > hidden; ++t) {
    const int64_t width = t + 1 == p2.ntiles ? p2.last_tile : p2.tile;
    std::memset(p2d + (t * p2.kp * p2.tile + hidden * width) * es, 0, (p2.kp - hidden) * width * es);
  }
  if (hidden > 0) {
    at::parallel_for(0, workers, 1, [&](int64_t a, int64_t b) {
      for (int64_t i = a; i < b; ++i)
        run_packed_pieces(isa, p1, l1, pieces1[i], i, xd, p1d, tile1, es, ytd + i * yt_each * es, bd1,
                          [&](Problem& q, int64_t t) {
                            q.y_panels = p2d + t * p2.kp * p2.tile * es;
                            q.y_kp = p2.kp;
                          });
    });
  }
  at::parallel_for(0, workers, 1, [&](int64_t a, int64_t b) {
    for (int64_t i = a; i < b; ++i) {
      for (const Piece& piece : pieces2[i]) {
        Problem q = tiles_of(p2, piece.t, piece.t + 1);
        q.y = yd + piece.t * p2.tile * l2.N * es;
        unit_range(isa, q, l2, p2d + piece.t * p2.kp * p2.tile * es, ytd + i * yt_each * es, bd2, piece.u0,
                   piece.u1);
      }
    }
  });
  return y;
}

}  // namespace

at::Tensor sparse_mlp_cpu(const at::Tensor& x, c10::string_view format1, const std::vector<at::Tensor>& weight1,
                          const std::optional<at::Tensor>& bias1, int64_t hidden, c10::string_view format2,
                          const std::vector<at::Tensor>& weight2, const std::optional<at::Tensor>& bias2,
                          int64_t out_features, bool gelu) {
  const char* op = "sparse_mlp (CPU)";
  check_x(op, x);
  TORCH_CHECK_VALUE(hidden >= 0 && out_features >= 0, op, ": hidden and out_features must be >= 0, got ", hidden,
                    " and ", out_features);
  const at::ScalarType ct = compute_type(x);
  const Layer l1 = mlp_layer(op, "fc1", x, x.size(1), ct, format1, weight1, hidden, bias1);
  const Layer l2 = mlp_layer(op, "fc2", x, hidden, ct, format2, weight2, out_features, bias2);
  const int64_t M = x.size(0);
  if (M == 0 || out_features == 0) return at::empty({M, out_features}, x.options());
  const at::Tensor xc = as_compute(x, ct);
  const Isa isa = isa_for(ct);
  Problem p1 = plan_layer(l1, M, isa, gelu);
  Problem p2 = plan_layer(l2, M, isa, false);
  TORCH_INTERNAL_ASSERT(p1.tile == p2.tile && p1.ntiles == p2.ntiles && p1.last_tile == p2.last_tile);
  const int64_t workers1 = worker_count(l1.flops_per_token * M), workers2 = worker_count(l2.flops_per_token * M);
  const int64_t workers = std::min(workers1, workers2);
  if (split_mode() != "rows" && workers > 1 && p1.ntiles >= workers)
    return finish(mlp_tokens(op, xc, isa, p1, l1, p2, l2, workers), x);
  const at::Tensor xp1 = prepare(isa, p1, xc, workers1, /*alloc_y=*/false).first;
  // fc2's panels: rows [hidden, kp2) are the padding of a bsr block that overhangs the hidden
  // width; fc1 writes rows < hidden, so those (and the tokens past M, which fc1 zeroes) are 0.
  at::Tensor xp2 = scratch(3, checked_product(op, "the hidden panels", p2.ntiles, p2.kp, p2.tile), xc.options());
  if (p2.kp > hidden) {
    char* base = static_cast<char*>(xp2.data_ptr());
    const int64_t es = xp2.element_size();
    for (int64_t t = 0; t < p2.ntiles; ++t) {
      const int64_t width = t + 1 == p2.ntiles ? p2.last_tile : p2.tile;
      std::memset(base + (t * p2.kp * p2.tile + hidden * width) * es, 0, (p2.kp - hidden) * width * es);
    }
  }
  p1.y_panels = xp2.data_ptr();
  p1.y_kp = p2.kp;
  if (hidden > 0) run_layer(op, isa, p1, l1, xp1.data_ptr(), workers1, xc.options());
  at::Tensor y = at::empty({M, out_features}, xc.options());
  p2.y = y.data_ptr();
  run_layer(op, isa, p2, l2, xp2.data_ptr(), workers2, xc.options());
  return finish(y, x);
}

}  // namespace cpu
}  // namespace sparse_prune

// Registered from Python after the ABI check (like sparse_prune._C): a stale build raises a
// Python error instead of aborting the interpreter on a schema mismatch.
#define SPARSE_PRUNE_CPU_ABI 3  // bump with every change of these ops' schemas in ops.py

namespace {

std::unique_ptr<torch::Library>& cpu_library() {
  static std::unique_ptr<torch::Library> library;
  return library;
}

PyObject* register_kernels(PyObject*, PyObject*) {
  try {
    if (!cpu_library()) {
      auto library = std::make_unique<torch::Library>(torch::Library::IMPL, "sparse_prune",
                                                      c10::DispatchKey::CPU, __FILE__, __LINE__);
      library->impl("csr_linear", &sparse_prune::cpu::csr_linear_cpu);
      library->impl("bsr_linear", &sparse_prune::cpu::bsr_linear_cpu);
      library->impl("semi24_linear", &sparse_prune::cpu::semi24_linear_cpu);
      library->impl("sparse_mlp", &sparse_prune::cpu::sparse_mlp_cpu);
      library->impl("attention", &sparse_prune::cpu::attention_cpu);
      cpu_library() = std::move(library);
    }
  } catch (const std::exception& e) {
    PyErr_SetString(PyExc_RuntimeError, e.what());
    return nullptr;
  }
  Py_RETURN_NONE;
}

PyObject* abi_version(PyObject*, PyObject*) { return PyLong_FromLong(SPARSE_PRUNE_CPU_ABI); }

PyObject* segment_cache_size(PyObject*, PyObject*) {
  return PyLong_FromLongLong(sparse_prune::cpu::segment_cache_size());
}

PyObject* clear_segment_cache(PyObject*, PyObject*) {
  sparse_prune::cpu::clear_segment_cache();
  Py_RETURN_NONE;
}

PyObject* isa(PyObject*, PyObject*) {
  try {
    return PyUnicode_FromString(sparse_prune::cpu::float_isa().c_str());
  } catch (const c10::Error& e) {  // one line, without the C++ backtrace
    PyErr_SetString(PyExc_ValueError, e.what_without_backtrace());
    return nullptr;
  }
}

PyObject* isas(PyObject*, PyObject*) {
  PyObject* out = PyList_New(0);
  const auto add = [out](const char* name) {  // PyList_Append does not steal the reference
    PyObject* item = PyUnicode_FromString(name);
    PyList_Append(out, item);
    Py_DECREF(item);
  };
  if (sparse_prune::cpu::cpu_has_avx512f()) add("avx512");
  if (sparse_prune::cpu::cpu_has_avx2_fma()) add("avx2");
  add("portable");
  return out;
}

PyMethodDef methods[] = {
    {"register_kernels", register_kernels, METH_NOARGS, "Register the CPU kernels of sparse_prune's ops (idempotent)."},
    {"abi_version", abi_version, METH_NOARGS, "The op-schema version these kernels were built for."},
    {"segment_cache_size", segment_cache_size, METH_NOARGS, "Csr weights whose segment layout is cached now."},
    {"clear_segment_cache", clear_segment_cache, METH_NOARGS,
     "Drop the cached csr segment layouts (after a change that bypassed the tensors' version counters)."},
    {"isa", isa, METH_NOARGS, "What float32 runs on now: 'avx512', 'avx2' or 'portable' (SPARSE_PRUNE_CPU_ISA)."},
    {"isas", isas, METH_NOARGS, "The ISAs this CPU and build can run, widest first."},
    {nullptr, nullptr, 0, nullptr}};

}  // namespace

extern "C" PyObject* PyInit__C_cpu(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C_cpu", nullptr, -1, methods};
  return PyModule_Create(&module_def);
}
