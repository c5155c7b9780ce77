// AVX2 pieces shared by the x86 ISA units (spmm_avx2.cpp, spmm_avx512.cpp): the exact GELU,
// the 8x8 transposes of the panel packing and of the epilogue. Included inside each unit's
// anonymous namespace, after its `#pragma GCC target`, so each copy is compiled for that unit.

// exp(a + b) for a + b <= 0, with a exact and |b| small (Cephes' expf: Cody-Waite reduction
// by ln 2, degree-5 polynomial). Reducing a before adding b keeps the relative error ~1e-7
// even when |a| is large (exp(-z²) in the GELU tails). Results below e^-87.3 are 0.
inline __m256 exp_split(__m256 a, __m256 b) {
  const __m256 lo = _mm256_set1_ps(-87.3f);
  const __m256 sum = _mm256_add_ps(a, b);
  const __m256 in_range = _mm256_cmp_ps(sum, lo, _CMP_GE_OQ);
  const __m256 x = _mm256_max_ps(sum, lo);
  const __m256 fx = _mm256_round_ps(_mm256_fmadd_ps(x, _mm256_set1_ps(1.44269504088896341f), _mm256_set1_ps(0.5f)),
                                    _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(fx, _mm256_set1_ps(0.693359375f), _mm256_max_ps(a, lo));
  r = _mm256_add_ps(r, b);
  r = _mm256_fnmadd_ps(fx, _mm256_set1_ps(-2.12194440e-4f), r);
  __m256 y = _mm256_set1_ps(1.9875691500e-4f);
  y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(1.3981999507e-3f));
  y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(8.3334519073e-3f));
  y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(4.1665795894e-2f));
  y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(1.6666665459e-1f));
  y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(5.0000001201e-1f));
  y = _mm256_fmadd_ps(y, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
  const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(fx), _mm256_set1_epi32(127)), 23);
  return _mm256_and_ps(_mm256_mul_ps(y, _mm256_castsi256_ps(e)), in_range);
}

// Exact GELU x·Φ(x) with Φ from erfc (Numerical Recipes' erfcc, fractional error < 1.2e-7),
// so both tails keep their relative accuracy: z² = x²/2 is carried as an exact float plus its
// FMA residual. NaN stays NaN, +inf stays +inf, -inf gives NaN (-inf·0), as F.gelu.
inline __m256 gelu(__m256 x) {
  const __m256 sign = _mm256_set1_ps(-0.0f);
  // |x| capped at 20 (Φ is 1 or < 1e-88 beyond): keeps x² finite; NaN maps to 20 here, and
  // x·Φ below is NaN again
  const __m256 ax = _mm256_min_ps(_mm256_andnot_ps(sign, x), _mm256_set1_ps(20.0f));
  const __m256 z = _mm256_mul_ps(ax, _mm256_set1_ps(0.70710678118654752f));
  const __m256 t = _mm256_div_ps(_mm256_set1_ps(1.0f), _mm256_fmadd_ps(z, _mm256_set1_ps(0.5f), _mm256_set1_ps(1.0f)));
  __m256 q = _mm256_set1_ps(0.17087277f);
  q = _mm256_fmadd_ps(q, t, _mm256_set1_ps(-0.82215223f));
  q = _mm256_fmadd_ps(q, t, _mm256_set1_ps(1.48851587f));
  q = _mm256_fmadd_ps(q, t, _mm256_set1_ps(-1.13520398f));
  q = _mm256_fmadd_ps(q, t, _mm256_set1_ps(0.27886807f));
  q = _mm256_fmadd_ps(q, t, _mm256_set1_ps(-0.18628806f));
  q = _mm256_fmadd_ps(q, t, _mm256_set1_ps(0.09678418f));
  q = _mm256_fmadd_ps(q, t, _mm256_set1_ps(0.37409196f));
  q = _mm256_fmadd_ps(q, t, _mm256_set1_ps(1.00002368f));
  q = _mm256_fmadd_ps(q, t, _mm256_set1_ps(-1.26551223f));
  const __m256 x2 = _mm256_mul_ps(ax, ax);
  const __m256 x2_err = _mm256_fmsub_ps(ax, ax, x2);  // x² = x2 + x2_err exactly
  const __m256 half = _mm256_set1_ps(0.5f);
  const __m256 e = exp_split(_mm256_mul_ps(x2, _mm256_set1_ps(-0.5f)), _mm256_fnmadd_ps(x2_err, half, q));
  // half_erfc = Φ(-|x|) = 0.5·erfc(|x|/√2)
  const __m256 half_erfc = _mm256_mul_ps(_mm256_mul_ps(t, half), e);
  const __m256 neg = _mm256_cmp_ps(x, _mm256_setzero_ps(), _CMP_LT_OQ);
  const __m256 phi = _mm256_blendv_ps(_mm256_sub_ps(_mm256_set1_ps(1.0f), half_erfc), half_erfc, neg);
  return _mm256_mul_ps(x, phi);
}

inline void transpose8(__m256& r0, __m256& r1, __m256& r2, __m256& r3, __m256& r4, __m256& r5,
                       __m256& r6, __m256& r7) {
  const __m256 t0 = _mm256_unpacklo_ps(r0, r1), t1 = _mm256_unpackhi_ps(r0, r1);
  const __m256 t2 = _mm256_unpacklo_ps(r2, r3), t3 = _mm256_unpackhi_ps(r2, r3);
  const __m256 t4 = _mm256_unpacklo_ps(r4, r5), t5 = _mm256_unpackhi_ps(r4, r5);
  const __m256 t6 = _mm256_unpacklo_ps(r6, r7), t7 = _mm256_unpackhi_ps(r6, r7);
  const __m256 s0 = _mm256_shuffle_ps(t0, t2, 0x44), s1 = _mm256_shuffle_ps(t0, t2, 0xEE);
  const __m256 s2 = _mm256_shuffle_ps(t1, t3, 0x44), s3 = _mm256_shuffle_ps(t1, t3, 0xEE);
  const __m256 s4 = _mm256_shuffle_ps(t4, t6, 0x44), s5 = _mm256_shuffle_ps(t4, t6, 0xEE);
  const __m256 s6 = _mm256_shuffle_ps(t5, t7, 0x44), s7 = _mm256_shuffle_ps(t5, t7, 0xEE);
  r0 = _mm256_permute2f128_ps(s0, s4, 0x20); r1 = _mm256_permute2f128_ps(s1, s5, 0x20);
  r2 = _mm256_permute2f128_ps(s2, s6, 0x20); r3 = _mm256_permute2f128_ps(s3, s7, 0x20);
  r4 = _mm256_permute2f128_ps(s0, s4, 0x31); r5 = _mm256_permute2f128_ps(s1, s5, 0x31);
  r6 = _mm256_permute2f128_ps(s2, s6, 0x31); r7 = _mm256_permute2f128_ps(s3, s7, 0x31);
}

struct X86Common {
  static void zero(float* p, int64_t n) {
    for (int64_t i = 0; i < n; i += 8) _mm256_store_ps(p + i, _mm256_setzero_ps());
  }

  // Y[t·tile + j][r] = act(yt[r - r0][j] + bias[r]) for the tile's valid tokens.
  static void epilogue(const Problem& p, const float* yt, int64_t t, int64_t r0, int64_t r1) {
    const int64_t tok0 = t * p.tile;
    const int64_t valid = p.M - tok0 < p.tile ? p.M - tok0 : p.tile;
    const float* bias = static_cast<const float*>(p.bias);
    float* y = static_cast<float*>(p.y) + tok0 * p.N;
    const int64_t rows = r1 - r0;
    const int64_t r8 = rows / 8 * 8;
    // Token blocks outer, rows inner: each group of 8 output rows (tokens) is written left to
    // right in whole cache lines (rows inner wrote each line in two halves, far apart in time:
    // measured 3x slower on M = 1576).
    for (int64_t j = 0; j < valid; j += 8) {
      const int64_t n = valid - j < 8 ? valid - j : 8;
      for (int64_t r = 0; r < r8; r += 8) {
        const __m256 bv = bias ? _mm256_loadu_ps(bias + r0 + r) : _mm256_setzero_ps();
        const float* s = yt + r * p.tile + j;
        __m256 v0 = _mm256_load_ps(s), v1 = _mm256_load_ps(s + p.tile), v2 = _mm256_load_ps(s + 2 * p.tile),
               v3 = _mm256_load_ps(s + 3 * p.tile), v4 = _mm256_load_ps(s + 4 * p.tile),
               v5 = _mm256_load_ps(s + 5 * p.tile), v6 = _mm256_load_ps(s + 6 * p.tile),
               v7 = _mm256_load_ps(s + 7 * p.tile);
        transpose8(v0, v1, v2, v3, v4, v5, v6, v7);
        const __m256 out[8] = {v0, v1, v2, v3, v4, v5, v6, v7};
        float* o = y + j * p.N + r0 + r;
        // unrolled, so that `out` stays in registers: a loop over a run-time count put it on the
        // stack (8 stores and 8 reloads per block). Measured (Zen 4, AVX2 path, M = 197, 21 rotating
        // rounds): csr 90% 1.006-1.021x, 99.9% (the fixed cost alone) 1.017-1.085x per GEMM.
        // Non-temporal stores were slower (0.86-0.99x): Y is read next from cache.
        if (p.gelu) {
#pragma GCC unroll 8
          for (int u = 0; u < 8; ++u)
            if (u < n) _mm256_storeu_ps(o + u * p.N, gelu(_mm256_add_ps(out[u], bv)));
        } else {
#pragma GCC unroll 8
          for (int u = 0; u < 8; ++u)
            if (u < n) _mm256_storeu_ps(o + u * p.N, _mm256_add_ps(out[u], bv));
        }
      }
    }
    int64_t r = r8;
    if (r < rows) {  // the last < 8 rows: one token at a time through a lane buffer
      const int64_t n = rows - r;
      alignas(32) float lane[8];
      for (int64_t j = 0; j < valid; ++j) {
        for (int64_t u = 0; u < 8; ++u) lane[u] = u < n ? yt[(r + u) * p.tile + j] + (bias ? bias[r0 + r + u] : 0.0f) : 0.0f;
        if (p.gelu) _mm256_store_ps(lane, gelu(_mm256_load_ps(lane)));
        for (int64_t u = 0; u < n; ++u) y[j * p.N + r0 + r + u] = lane[u];
      }
    }
  }

  // Rows [r0, r1) of tile t into the next layer's panels (Problem::y_panels): contiguous runs
  // of the tile's width, act(yt + bias) for the valid tokens and 0 past M.
  static void to_panels(const Problem& p, const float* yt, int64_t t, int64_t r0, int64_t r1) {
    const int64_t valid = p.M - t * p.tile < p.tile ? p.M - t * p.tile : p.tile;
    const int64_t width = tile_width(p, t);
    const float* bias = static_cast<const float*>(p.bias);
    float* panel = static_cast<float*>(p.y_panels) + t * p.y_kp * p.tile;
    for (int64_t r = r0; r < r1; ++r) {
      const float* s = yt + (r - r0) * p.tile;
      float* d = panel + r * width;
      const __m256 bv = _mm256_set1_ps(bias ? bias[r] : 0.0f);
      for (int64_t j = 0; j < width; j += 8) {
        __m256 o = _mm256_add_ps(_mm256_loadu_ps(s + j), bv);
        if (p.gelu) o = gelu(o);
        if (j + 8 > valid) {  // the tokens past M are 0 in a panel
          alignas(32) float lane[8];
          _mm256_store_ps(lane, o);
          for (int64_t u = 0; u < 8; ++u) lane[u] = j + u < valid ? lane[u] : 0.0f;
          o = _mm256_load_ps(lane);
        }
        _mm256_storeu_ps(d + j, o);
      }
    }
  }

  // Panel t: xp[k][j] = x[tok0 + j][k] (zero past M and past K), rows of the tile's width, in
  // 8x8 transposes.
  static void pack(const Problem& p, const float* x, float* xp, int64_t t) {
    const int64_t tok0 = t * p.tile;
    const int64_t width = tile_width(p, t);
    float* panel = xp + t * p.kp * p.tile;
    const int64_t k8 = p.K / 8 * 8;
    for (int64_t j = 0; j < width; j += 8) {
      const int64_t n = p.M - tok0 - j < 8 ? p.M - tok0 - j : 8;  // valid tokens (may be <= 0)
      const float* src = x + (tok0 + j) * p.K;
      for (int64_t k = 0; k < k8; k += 8) {
        __m256 v[8];
        for (int64_t u = 0; u < 8; ++u) v[u] = u < n ? _mm256_loadu_ps(src + u * p.K + k) : _mm256_setzero_ps();
        transpose8(v[0], v[1], v[2], v[3], v[4], v[5], v[6], v[7]);
        for (int64_t u = 0; u < 8; ++u) _mm256_storeu_ps(panel + (k + u) * width + j, v[u]);
      }
      for (int64_t k = k8; k < p.kp; ++k)
        for (int64_t u = 0; u < 8; ++u)
          panel[k * width + j + u] = (u < n && k < p.K) ? src[u * p.K + k] : 0.0f;
    }
  }
};

// The micro-kernels over one vector type Vt (Ymm here; Zmm in spmm_avx512.cpp): Vt::R is the
// register, kLanes its floats. Two accumulator sets (stored weights alternate between them;
// four for csr's one-vector tiles) hide the 4-cycle FMA latency when V is small. Panel rows of a tile are `ps` floats apart
// (the tile's width, a multiple of kLanes), Yᵀ rows `ys` apart.
template <class Vt, int MaxV, int RowChunk>
struct SimdMicro : X86Common {
  using R = typename Vt::R;
  static constexpr int kLanes = Vt::kLanes;
  static constexpr int kMaxV = MaxV;

  // Four stored weights in one load (Vt::bcast4), each spread over the vector by an in-lane
  // shuffle (Vt::lane, a shuffle port) instead of a broadcast load per weight: a lone row's
  // weight then costs V + 1/4 vector loads instead of V + 1, where the loads, not the FMAs,
  // bound the loop. Measured (Zen 4, one process, 41 paired rounds, fc1/fc2/qkv/proj, M = 197):
  // AVX2 1.024-1.084x at 50-90% sparse and 1.008-1.047x at 2:4, AVX-512 1.00-1.034x. Only where
  // the two rows' accumulators, both loaded weight vectors and the shuffled one fit in the
  // registers: AVX2 at 48-token tiles (6 ymm per row) spilled three accumulators and ran 0.89x
  // at 2:4 (fc2, M = 1576). The sums keep their order and chains, so results are unchanged.
  template <int V>
  static constexpr bool kBcast4Pair = (V <= 2 ? 4 * V : 2 * V) + 5 <= Vt::kRegs;
  template <int V>
  static constexpr bool kBcast4Lone = 2 * V + 3 <= Vt::kRegs;

  template <int V>
  static inline void start(R (&a)[V], R (&b)[V]) {
#pragma GCC unroll 8
    for (int v = 0; v < V; ++v) a[v] = b[v] = Vt::zero();
  }

  template <int V>
  static inline void fma_row(R (&a)[V], R w, const float* x) {
#pragma GCC unroll 8
    for (int v = 0; v < V; ++v) a[v] = Vt::fma(w, Vt::load(x + kLanes * v), a[v]);
  }

  // The panel stride is the tile's width, V·kLanes: a compile-time constant, so the address of
  // a column is a shift/lea, not an imul, behind every index load. One-vector tiles (V = 1)
  // use four accumulators: with two, the FMA latency (4 cycles per chain) bounded a 16-token
  // tile to 2 cycles per stored weight (measured on fc1 90%, AVX-512).
  template <int V, typename I>
  static void csr_seg(const float* panel, int64_t /*width*/, const float* val, const I* col, int64_t p0,
                      int64_t p1, float* yt, bool first) {
    constexpr int64_t ps = V * kLanes;
    constexpr int S = V == 1 ? 4 : 2;
    R acc[S][V];
#pragma GCC unroll 4
    for (int s = 0; s < S; ++s)
#pragma GCC unroll 8
      for (int v = 0; v < V; ++v) acc[s][v] = (s == 0 && !first) ? Vt::load(yt + kLanes * v) : Vt::zero();
    int64_t q = p0;
    for (; q + S <= p1; q += S) {
#pragma GCC unroll 4
      for (int s = 0; s < S; ++s)
        fma_row<V>(acc[s], Vt::bcast(val + q + s), panel + static_cast<int64_t>(col[q + s]) * ps);
    }
#pragma GCC unroll 4
    for (int s = 0; s < S - 1; ++s)
      if (q + s < p1) fma_row<V>(acc[s], Vt::bcast(val + q + s), panel + static_cast<int64_t>(col[q + s]) * ps);
#pragma GCC unroll 8
    for (int v = 0; v < V; ++v) {
      R sum = acc[0][v];
#pragma GCC unroll 4
      for (int s = 1; s < S; ++s) sum = Vt::add(sum, acc[s][v]);
      Vt::store(yt + kLanes * v, sum);
    }
  }

  // csr_segs' segments (spmm.h's SegmentHead). Each sums its weights from zero and then adds the
  // sum to its Yᵀ row (stores it, for the first sub-block): a row's total is a sum of
  // per-sub-block sums, not one chain through the whole row, which at 50% of K = 3072 (1,536
  // terms) exceeded the agreement rule (6.9e-7 against 6.2e-7).
  // y = sum (first sub-block) or y + sum.
  template <int V>
  static inline void add_segment(float* y, const R (&sum)[V], bool first) {
#pragma GCC unroll 8
    for (int v = 0; v < V; ++v) Vt::store(y + kLanes * v, first ? sum[v] : Vt::add(Vt::load(y + kLanes * v), sum[v]));
  }

  // Keeps a loaded vector in a register: gcc otherwise folds the load into each of its FMAs as a
  // memory operand and loads it twice (seen in the disassembly), undoing the point of sharing it.
  static inline void in_register(R& x) { asm("" : "+v"(x)); }

  // One column both rows keep: its Xᵀ vectors loaded once, an FMA of each row (weights w0, w1)
  // on each.
  template <int V>
  static inline void fma_shared2(R (&a)[V], R (&b)[V], R w0, R w1, const float* x) {
#pragma GCC unroll 8
    for (int v = 0; v < V; ++v) {
      R xv = Vt::load(x + kLanes * v);
      in_register(xv);
      a[v] = Vt::fma(w0, xv, a[v]);
      b[v] = Vt::fma(w1, xv, b[v]);
    }
  }

  // The same with the two weights broadcast from w[0], w[1].
  template <int V>
  static inline void fma_shared(R (&a)[V], R (&b)[V], const float* w, const float* x) {
    fma_shared2<V>(a, b, Vt::bcast(w), Vt::bcast(w + 1), x);
  }

  template <int V>
  static inline void fold(R (&a)[V], const R (&b)[V]) {
#pragma GCC unroll 8
    for (int v = 0; v < V; ++v) a[v] = Vt::add(a[v], b[v]);
  }

  // Two rows' segment: `shared` columns both keep (fma_shared), `paired` weights of each alone
  // side by side, then `tail` more of row 0 once row 1 is added to y1. Each row runs on S
  // accumulator sets of its own (alternate weights; the tail on row 1's as well): S = 2 for
  // tiles of 1-2 vectors, whose chains would otherwise wait on the 4-cycle FMA latency. Measured
  // in a standalone loop (Zen 3, 40-token tiles, random masks): 4.06 against 3.17 ymm FMAs/ns at
  // 2:4 for two rows with as many weights run side by side without sharing loads.
  template <int V>
  static void csr_shared(const float* panel, int64_t /*width*/, const float* val, const uint8_t* col,
                         int64_t shared, int64_t paired, int64_t tail, float* y0, float* y1, bool first) {
    constexpr int64_t ps = V * kLanes;
    constexpr int S = V <= 2 ? 2 : 1;
    R a[S][V], b[S][V];
#pragma GCC unroll 2
    for (int s = 0; s < S; ++s) {
      start<V>(a[s], b[s]);
    }
    const auto x = [&](int64_t i) { return panel + static_cast<int64_t>(col[i]) * ps; };
    int64_t i = 0;
    if (kBcast4Pair<V>) {
      for (; i + 2 <= shared; i += 2) {
        R w = Vt::bcast4(val + 2 * i);
        in_register(w);
        fma_shared2<V>(a[0], b[0], Vt::template lane<0>(w), Vt::template lane<1>(w), x(i));
        fma_shared2<V>(a[1 % S], b[1 % S], Vt::template lane<2>(w), Vt::template lane<3>(w), x(i + 1));
      }
    }
    for (; i + S <= shared; i += S) {
#pragma GCC unroll 2
      for (int s = 0; s < S; ++s) fma_shared<V>(a[s], b[s], val + 2 * (i + s), x(i + s));
    }
    if (i < shared) fma_shared<V>(a[0], b[0], val + 2 * i, x(i));
    val += 2 * shared;
    col += shared;
    i = 0;
    if (kBcast4Pair<V>) {
      for (; i + 4 <= paired; i += 4) {
        R wa = Vt::bcast4(val + i), wb = Vt::bcast4(val + paired + i);
        in_register(wa);
        in_register(wb);
        fma_row<V>(a[0], Vt::template lane<0>(wa), x(i));
        fma_row<V>(b[0], Vt::template lane<0>(wb), x(paired + i));
        fma_row<V>(a[1 % S], Vt::template lane<1>(wa), x(i + 1));
        fma_row<V>(b[1 % S], Vt::template lane<1>(wb), x(paired + i + 1));
        fma_row<V>(a[0], Vt::template lane<2>(wa), x(i + 2));
        fma_row<V>(b[0], Vt::template lane<2>(wb), x(paired + i + 2));
        fma_row<V>(a[1 % S], Vt::template lane<3>(wa), x(i + 3));
        fma_row<V>(b[1 % S], Vt::template lane<3>(wb), x(paired + i + 3));
      }
    }
    for (; i + S <= paired; i += S) {
#pragma GCC unroll 2
      for (int s = 0; s < S; ++s) {
        fma_row<V>(a[s], Vt::bcast(val + i + s), x(i + s));
        fma_row<V>(b[s], Vt::bcast(val + paired + i + s), x(paired + i + s));
      }
    }
    if (i < paired) {
      fma_row<V>(a[0], Vt::bcast(val + i), x(i));
      fma_row<V>(b[0], Vt::bcast(val + paired + i), x(paired + i));
    }
    if (S == 2) fold<V>(b[0], b[S - 1]);
    add_segment<V>(y1, b[0], first);
    val += 2 * paired;
    col += 2 * paired;
    if (tail > 0) {
#pragma GCC unroll 2
      for (int s = 0; s < S; ++s) start<V>(b[s], b[s]);
      i = 0;
      if (kBcast4Pair<V>) {
        for (; i + 4 <= tail; i += 4) {
          R w = Vt::bcast4(val + i);
          in_register(w);
          fma_row<V>(a[0], Vt::template lane<0>(w), x(i));
          fma_row<V>(b[0], Vt::template lane<1>(w), x(i + 1));
          fma_row<V>(a[S - 1], Vt::template lane<2>(w), x(i + 2));
          fma_row<V>(b[S - 1], Vt::template lane<3>(w), x(i + 3));
        }
      }
      for (; i + 2 * S <= tail; i += 2 * S) {
#pragma GCC unroll 2
        for (int s = 0; s < S; ++s) {
          fma_row<V>(a[s], Vt::bcast(val + i + 2 * s), x(i + 2 * s));
          fma_row<V>(b[s], Vt::bcast(val + i + 2 * s + 1), x(i + 2 * s + 1));
        }
      }
      for (; i < tail; ++i) fma_row<V>(a[0], Vt::bcast(val + i), x(i));
#pragma GCC unroll 2
      for (int s = 0; s < S; ++s) fold<V>(a[s], b[s]);
    }
    if (S == 2) fold<V>(a[0], a[S - 1]);
    add_segment<V>(y0, a[0], first);
  }

  // A lone row's segment: two accumulator sets (alternate weights), then added as csr_shared's.
  template <int V>
  static void csr_lone(const float* panel, int64_t /*width*/, const float* val, const uint8_t* col, int64_t len,
                       float* y, bool first) {
    constexpr int64_t ps = V * kLanes;
    R a[V], b[V];
    start<V>(a, b);
    int64_t i = 0;
    if (kBcast4Lone<V>) {
      for (; i + 4 <= len; i += 4) {
        R w = Vt::bcast4(val + i);
        in_register(w);
        fma_row<V>(a, Vt::template lane<0>(w), panel + static_cast<int64_t>(col[i]) * ps);
        fma_row<V>(b, Vt::template lane<1>(w), panel + static_cast<int64_t>(col[i + 1]) * ps);
        fma_row<V>(a, Vt::template lane<2>(w), panel + static_cast<int64_t>(col[i + 2]) * ps);
        fma_row<V>(b, Vt::template lane<3>(w), panel + static_cast<int64_t>(col[i + 3]) * ps);
      }
    }
    for (; i + 2 <= len; i += 2) {
      fma_row<V>(a, Vt::bcast(val + i), panel + static_cast<int64_t>(col[i]) * ps);
      fma_row<V>(b, Vt::bcast(val + i + 1), panel + static_cast<int64_t>(col[i + 1]) * ps);
    }
    if (i < len) fma_row<V>(a, Vt::bcast(val + i), panel + static_cast<int64_t>(col[i]) * ps);
#pragma GCC unroll 8
    for (int v = 0; v < V; ++v) a[v] = Vt::add(a[v], b[v]);
    add_segment<V>(y, a, first);
  }

  // Four rows of a block row at once, over C vectors of the tile starting at vector v0: every
  // loaded Xᵀ vector feeds four FMAs (one per row), so blocks with bm >= 4 (4x1, 8x1, 16x1,
  // 4x4, ...) are FMA-bound rather than load-bound like one row at a time.
  template <int C, int64_t ps, typename I, int64_t BK = 0>
  static inline void bsr_rows4(const float* panel, int64_t v0, int64_t ys, const float* val, int64_t bm,
                               int64_t bk_, int64_t i0, const I* col, int64_t p0, int64_t p1, float* yt,
                               bool first) {
    const int64_t bk = BK > 0 ? BK : bk_;
    R acc[4][C];
#pragma GCC unroll 4
    for (int i = 0; i < 4; ++i)
#pragma GCC unroll 8
      for (int c = 0; c < C; ++c) acc[i][c] = Vt::zero();
    for (int64_t q = p0; q < p1; ++q) {
      const float* x = panel + static_cast<int64_t>(col[q]) * bk * ps + v0 * kLanes;
      const float* w = val + (q * bm + i0) * bk;
#pragma GCC unroll 16
      for (int64_t j = 0; j < bk; ++j) {
        const R w0 = Vt::bcast(w + j), w1 = Vt::bcast(w + bk + j), w2 = Vt::bcast(w + 2 * bk + j),
                w3 = Vt::bcast(w + 3 * bk + j);
#pragma GCC unroll 8
        for (int c = 0; c < C; ++c) {
          const R xv = Vt::load(x + j * ps + c * kLanes);
          acc[0][c] = Vt::fma(w0, xv, acc[0][c]);
          acc[1][c] = Vt::fma(w1, xv, acc[1][c]);
          acc[2][c] = Vt::fma(w2, xv, acc[2][c]);
          acc[3][c] = Vt::fma(w3, xv, acc[3][c]);
        }
      }
    }
#pragma GCC unroll 4
    for (int i = 0; i < 4; ++i) add_segment<C>(yt + (i0 + i) * ys + v0 * kLanes, acc[i], first);
  }

  // One block row: nrows (<= bm) rows, blocks [p0, p1) (one K-block); row i reads
  // values[blk][i][0..bk). Rows go four at a time (bsr_rows4, RowChunk vectors per pass), the
  // rest one at a time. Each row's K-block is summed from zero and then added to its Yᵀ row (y
  // = sum for the first): carried through the whole row, fc2's chains (~920 terms at 70%)
  // came out at 1.23e-6 against the agreement rule's 1.21e-6 end to end (ViT-B/16 batch 8,
  // bsr 16x1 and 4x4 70%, AVX-512).
  // The block widths of the CPU blocks (1, 4, 8, 16, 32) get a body of their own with the width a
  // constant: the column loop unrolls and its addresses become immediates. Measured (Zen 4, one
  // process, 41 paired rounds, fc1/fc2 90%, M = 197) against the width read at run time: AVX2
  // 1.48-1.60x for 4x1/8x1/16x1, 1.09-1.14x for 4x4, 1.03x for 16x16; AVX-512 1.07-1.15x,
  // 1.02x and 1.02x. Other widths run the generic body, and so do int16/int64 block columns:
  // BSR.from_dense stores int32, and a body per width and index type made this unit's compile
  // the longest step of the CPU build.
  template <int V, typename I>
  static void bsr_seg(const float* panel, int64_t width, int64_t ys, const float* val, int64_t bm,
                      int64_t bk, int64_t nrows, const I* col, int64_t p0, int64_t p1, float* yt, bool first) {
    if constexpr (sizeof(I) == 4) {
      switch (bk) {
        case 1: return bsr_seg_k<V, I, 1>(panel, width, ys, val, bm, bk, nrows, col, p0, p1, yt, first);
        case 4: return bsr_seg_k<V, I, 4>(panel, width, ys, val, bm, bk, nrows, col, p0, p1, yt, first);
        case 8: return bsr_seg_k<V, I, 8>(panel, width, ys, val, bm, bk, nrows, col, p0, p1, yt, first);
        case 16: return bsr_seg_k<V, I, 16>(panel, width, ys, val, bm, bk, nrows, col, p0, p1, yt, first);
        case 32: return bsr_seg_k<V, I, 32>(panel, width, ys, val, bm, bk, nrows, col, p0, p1, yt, first);
        default: break;
      }
    }
    bsr_seg_k<V, I, 0>(panel, width, ys, val, bm, bk, nrows, col, p0, p1, yt, first);
  }

  template <int V, typename I, int64_t BK>
  static void bsr_seg_k(const float* panel, int64_t /*width*/, int64_t ys, const float* val, int64_t bm,
                        int64_t bk_, int64_t nrows, const I* col, int64_t p0, int64_t p1, float* yt, bool first) {
    constexpr int64_t ps = V * kLanes;
    const int64_t bk = BK > 0 ? BK : bk_;
    int64_t i4 = 0;
    for (; i4 + 4 <= nrows; i4 += 4) {
      for (int64_t v0 = 0; v0 < V; v0 += RowChunk) {
        with_vectors<RowChunk>(V - v0 < RowChunk ? V - v0 : RowChunk, [&](auto cc) {
          bsr_rows4<decltype(cc)::value, ps, I, BK>(panel, v0, ys, val, bm, bk, i4, col, p0, p1, yt, first);
        });
      }
    }
    for (int64_t i = i4; i < nrows; ++i) {
      R a[V], b[V];
      float* out = yt + i * ys;
      start<V>(a, b);
      if (bk == 1) {
        int64_t q = p0;
        for (; q + 2 <= p1; q += 2) {
          fma_row<V>(a, Vt::bcast(val + q * bm + i), panel + static_cast<int64_t>(col[q]) * ps);
          fma_row<V>(b, Vt::bcast(val + (q + 1) * bm + i), panel + static_cast<int64_t>(col[q + 1]) * ps);
        }
        if (q < p1) fma_row<V>(a, Vt::bcast(val + q * bm + i), panel + static_cast<int64_t>(col[q]) * ps);
      } else {
        for (int64_t q = p0; q < p1; ++q) {
          const float* w = val + (q * bm + i) * bk;
          const float* x = panel + static_cast<int64_t>(col[q]) * bk * ps;
          int64_t j = 0;
          // four weights per load, as csr_lone (1x4, 1x8: 1.02-1.09x, measured as above)
          if constexpr (BK > 0 && BK % 4 == 0 && kBcast4Lone<V>) {
#pragma GCC unroll 8
            for (; j < BK; j += 4) {
              R w4 = Vt::bcast4(w + j);
              in_register(w4);
              fma_row<V>(a, Vt::template lane<0>(w4), x + j * ps);
              fma_row<V>(b, Vt::template lane<1>(w4), x + (j + 1) * ps);
              fma_row<V>(a, Vt::template lane<2>(w4), x + (j + 2) * ps);
              fma_row<V>(b, Vt::template lane<3>(w4), x + (j + 3) * ps);
            }
          }
#pragma GCC unroll 16
          for (; j + 2 <= bk; j += 2) {
            fma_row<V>(a, Vt::bcast(w + j), x + j * ps);
            fma_row<V>(b, Vt::bcast(w + j + 1), x + (j + 1) * ps);
          }
          if (j < bk) fma_row<V>(a, Vt::bcast(w + j), x + j * ps);
        }
      }
      fold<V>(a, b);
      add_segment<V>(out, a, first);
    }
  }

  // 2:4: groups [g0, g1) of one row; the two columns of a group come from its nibble.
  template <int V>
  static void semi_seg(const float* panel, int64_t /*width*/, const float* val, const int16_t* meta,
                       int64_t g0, int64_t g1, float* yt, bool first) {
    constexpr int64_t ps = V * kLanes;
    R a[V], b[V];
    // summed from zero, then added to the row: one chain through a whole row of fc2 (AVX2: 1,536
    // terms over two sets) came out at 5.04e-7 against the agreement rule's 5.01e-7
    start<V>(a, b);
    for (int64_t g = g0; g < g1; ++g) {
      int64_t c0, c1;
      semi24_columns(meta, g, c0, c1);
      fma_row<V>(a, Vt::bcast(val + 2 * g), panel + c0 * ps);
      fma_row<V>(b, Vt::bcast(val + 2 * g + 1), panel + c1 * ps);
    }
#pragma GCC unroll 8
    for (int v = 0; v < V; ++v) a[v] = Vt::add(a[v], b[v]);
    add_segment<V>(yt, a, first);
  }
};

struct Ymm {
  using R = __m256;
  static constexpr int kLanes = 8;
  static constexpr int kRegs = 16;
  static inline R zero() { return _mm256_setzero_ps(); }
  static inline R load(const float* p) { return _mm256_loadu_ps(p); }
  static inline void store(float* p, R v) { _mm256_storeu_ps(p, v); }
  static inline R bcast(const float* p) { return _mm256_broadcast_ss(p); }
  static inline R bcast4(const float* p) { const __m128 v = _mm_loadu_ps(p); return _mm256_set_m128(v, v); }
  template <int U>
  static inline R lane(R w) { return _mm256_permute_ps(w, U * 0x55); }
  static inline R fma(R w, R x, R a) { return _mm256_fmadd_ps(w, x, a); }
  static inline R add(R a, R b) { return _mm256_add_ps(a, b); }
  // for attention_kernel.h
  static inline R set1(float v) { return _mm256_set1_ps(v); }
  static inline R sub(R a, R b) { return _mm256_sub_ps(a, b); }
  static inline R mul(R a, R b) { return _mm256_mul_ps(a, b); }
  static inline R max(R a, R b) { return _mm256_max_ps(a, b); }
  static inline R exp_neg(R x) { return exp_split(x, _mm256_setzero_ps()); }
  static inline float hmax(R v) {
    __m128 m = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    m = _mm_max_ps(m, _mm_movehl_ps(m, m));
    return _mm_cvtss_f32(_mm_max_ss(m, _mm_movehdup_ps(m)));
  }
  static inline float hsum(R v) {
    __m128 m = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    m = _mm_add_ps(m, _mm_movehl_ps(m, m));
    return _mm_cvtss_f32(_mm_add_ss(m, _mm_movehdup_ps(m)));
  }
};
