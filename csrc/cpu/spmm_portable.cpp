// Portable micro-kernels: plain C++ loops over fixed-width token runs that the compiler
// vectorizes for whatever the build targets (SSE2 on x86-64, NEON on arm64). Every CPU runs
// them: float32 where AVX2+FMA is missing (or SPARSE_PRUNE_CPU_ISA=portable), and float64.
#include <cmath>

#include "spmm.h"

namespace sparse_prune {
namespace cpu {
namespace {

#include "spmm_driver.h"

// Exact GELU, evaluated in double: scaling x by 1/√2 in float already costs the left tail
// ~2·z²·eps of relative accuracy in erfc (1e-5 at x = -12).
template <typename T>
inline T gelu(T x) {
  const double v = static_cast<double>(x);
  return static_cast<T>(v * (0.5 * std::erfc(-v * 0.70710678118654752440)));
}

template <typename T>
struct Portable {
  static constexpr int kLanes = 8;
  static constexpr int kMaxV = 6;

  static void zero(T* p, int64_t n) {
    for (int64_t i = 0; i < n; ++i) p[i] = T(0);
  }

  template <int V, typename I>
  static void csr_seg(const T* panel, int64_t tile, const T* val, const I* col, int64_t p0, int64_t p1,
                      T* yt, bool first) {
    constexpr int W = V * kLanes;
    // two accumulator sets, alternate weights (as the x86 units): one sequential sum of ~300
    // float32 terms exceeded the agreement rule (3.3e-7 against 3.2e-7, K = 600 at 50%)
    T a[W], c[W];
    for (int j = 0; j < W; ++j) {
      a[j] = first ? T(0) : yt[j];
      c[j] = T(0);
    }
    int64_t q = p0;
    for (; q + 2 <= p1; q += 2) {
      const T w0 = val[q], w1 = val[q + 1];
      const T* x0 = panel + static_cast<int64_t>(col[q]) * tile;
      const T* x1 = panel + static_cast<int64_t>(col[q + 1]) * tile;
      for (int j = 0; j < W; ++j) {
        a[j] += w0 * x0[j];
        c[j] += w1 * x1[j];
      }
    }
    if (q < p1) {
      const T w = val[q];
      const T* x = panel + static_cast<int64_t>(col[q]) * tile;
      for (int j = 0; j < W; ++j) a[j] += w * x[j];
    }
    for (int j = 0; j < W; ++j) yt[j] = a[j] + c[j];
  }

  // csr_segs' segments (the x86 units' contract): each summed from zero, then added to its row.
  template <int V>
  static void csr_lone(const T* panel, int64_t width, const T* val, const uint8_t* col, int64_t len, T* y,
                       bool first) {
    constexpr int W = V * kLanes;
    T sum[W];
    csr_seg<V, uint8_t>(panel, width, val, col, 0, len, sum, true);
    for (int j = 0; j < W; ++j) y[j] = first ? sum[j] : y[j] + sum[j];
  }

  // Two rows' segment (spmm.h's SegmentHead): shared columns, paired weights, row 0's tail; each
  // row summed from zero on one accumulator set (at most `span` <= 256 terms), then added.
  template <int V>
  static void csr_shared(const T* panel, int64_t width, const T* val, const uint8_t* col, int64_t shared,
                         int64_t paired, int64_t tail, T* y0, T* y1, bool first) {
    constexpr int W = V * kLanes;
    T a[W], b[W];
    for (int j = 0; j < W; ++j) a[j] = b[j] = T(0);
    const auto x = [&](int64_t i) { return panel + static_cast<int64_t>(col[i]) * width; };
    for (int64_t i = 0; i < shared; ++i) {
      const T w0 = val[2 * i], w1 = val[2 * i + 1];
      const T* xi = x(i);
      for (int j = 0; j < W; ++j) {
        a[j] += w0 * xi[j];
        b[j] += w1 * xi[j];
      }
    }
    val += 2 * shared;
    col += shared;
    for (int64_t i = 0; i < paired; ++i) {
      const T w0 = val[i], w1 = val[paired + i];
      const T *x0 = x(i), *x1 = x(paired + i);
      for (int j = 0; j < W; ++j) {
        a[j] += w0 * x0[j];
        b[j] += w1 * x1[j];
      }
    }
    val += 2 * paired;
    col += 2 * paired;
    for (int64_t i = 0; i < tail; ++i) {
      const T w = val[i];
      const T* xi = x(i);
      for (int j = 0; j < W; ++j) a[j] += w * xi[j];
    }
    for (int j = 0; j < W; ++j) {
      y0[j] = first ? a[j] : y0[j] + a[j];
      y1[j] = first ? b[j] : y1[j] + b[j];
    }
  }

  template <int V, typename I>
  static void bsr_seg(const T* panel, int64_t tile, int64_t ys, const T* val, int64_t bm, int64_t bk,
                      int64_t nrows, const I* col, int64_t p0, int64_t p1, T* yt, bool first) {
    constexpr int W = V * kLanes;
    // each K-block summed from zero, then added to its row (as the csr segments and 2:4): one
    // chain through a row of fc2 (~920 terms at 70%) broke the agreement rule (see X86Common)
    for (int64_t i = 0; i < nrows; ++i) {
      T a[W];
      T* out = yt + i * ys;
      for (int j = 0; j < W; ++j) a[j] = T(0);
      for (int64_t q = p0; q < p1; ++q) {
        const T* w = val + (q * bm + i) * bk;
        const T* x = panel + static_cast<int64_t>(col[q]) * bk * tile;
        for (int64_t c = 0; c < bk; ++c)
          for (int j = 0; j < W; ++j) a[j] += w[c] * x[c * tile + j];
      }
      for (int j = 0; j < W; ++j) out[j] = first ? a[j] : out[j] + a[j];
    }
  }

  template <int V>
  static void semi_seg(const T* panel, int64_t tile, const T* val, const int16_t* meta, int64_t g0,
                       int64_t g1, T* yt, bool first) {
    constexpr int W = V * kLanes;
    // the K-block's segment summed from zero, then added to its row (as the csr segments): one
    // chain through a whole row of fc2 (1,536 terms) broke the agreement rule
    T a[W];
    for (int j = 0; j < W; ++j) a[j] = T(0);
    for (int64_t g = g0; g < g1; ++g) {
      int64_t c0, c1;
      semi24_columns(meta, g, c0, c1);
      const T w0 = val[2 * g], w1 = val[2 * g + 1];
      const T* x0 = panel + c0 * tile;
      const T* x1 = panel + c1 * tile;
      for (int j = 0; j < W; ++j) a[j] += w0 * x0[j] + w1 * x1[j];
    }
    for (int j = 0; j < W; ++j) yt[j] = first ? a[j] : yt[j] + a[j];
  }

  static void epilogue(const Problem& p, const T* yt, int64_t t, int64_t r0, int64_t r1) {
    const int64_t tok0 = t * p.tile;
    const int64_t valid = p.M - tok0 < p.tile ? p.M - tok0 : p.tile;
    const T* bias = static_cast<const T*>(p.bias);
    T* y = static_cast<T*>(p.y) + tok0 * p.N;
    for (int64_t j = 0; j < valid; ++j) {
      T* out = y + j * p.N;
      for (int64_t r = r0; r < r1; ++r) {
        T v = yt[(r - r0) * p.tile + j] + (bias ? bias[r] : T(0));
        out[r] = p.gelu ? gelu(v) : v;
      }
    }
  }

  static void to_panels(const Problem& p, const T* yt, int64_t t, int64_t r0, int64_t r1) {
    const int64_t valid = p.M - t * p.tile < p.tile ? p.M - t * p.tile : p.tile;
    const int64_t width = tile_width(p, t);
    const T* bias = static_cast<const T*>(p.bias);
    T* panel = static_cast<T*>(p.y_panels) + t * p.y_kp * p.tile;
    for (int64_t r = r0; r < r1; ++r) {
      const T* s = yt + (r - r0) * p.tile;
      T* d = panel + r * width;
      const T b = bias ? bias[r] : T(0);
      for (int64_t j = 0; j < valid; ++j) d[j] = p.gelu ? gelu(s[j] + b) : s[j] + b;
      for (int64_t j = valid; j < width; ++j) d[j] = T(0);
    }
  }

  static void pack(const Problem& p, const T* x, T* xp, int64_t t) {
    const int64_t tok0 = t * p.tile;
    const int64_t width = tile_width(p, t);
    T* panel = xp + t * p.kp * p.tile;
    for (int64_t k = 0; k < p.kp; ++k)
      for (int64_t j = 0; j < width; ++j)
        panel[k * width + j] = (k < p.K && tok0 + j < p.M) ? x[(tok0 + j) * p.K + k] : T(0);
  }
};

}  // namespace

namespace portable_f32 {
SPARSE_PRUNE_ENTRY_POINTS(Portable<float>, float)
SPARSE_PRUNE_SEGS_ENTRY_POINT(Portable<float>)
}
namespace portable_f64 {
SPARSE_PRUNE_ENTRY_POINTS(Portable<double>, double)
}


int64_t scratch_floats(const Problem& p, int64_t rows) { return rows * p.tile; }

int64_t bounds_stride(const Problem& p) { return (p.kblock > 0 ? (p.kp + p.kblock - 1) / p.kblock : 0) + 1; }

int64_t scratch_bounds(const Problem& p, int64_t rows) { return rows * (bounds_stride(p) + 1); }

}  // namespace cpu
}  // namespace sparse_prune
