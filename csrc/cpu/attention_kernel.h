// The attention kernel of the x86 ISA units: softmax(scale · Q·Kᵀ) · V for one (batch, head)
// and a run of query rows per task, float32 (attention.h). Included inside a unit's anonymous
// namespace after its `#pragma GCC target`, with its vector type V: zero, load, store, bcast,
// fma, add, sub, mul, max, set1, hmax, hsum and exp_neg (exp of lanes <= 0, 0 below e^-87.3).
//
// Per task: K is packed once as Kᵀ in panels of NC = NV·lanes keys ([D][NC] each, zeros past Lk)
// and V in panels of NC value columns ([Lk][NC] each, zeros past Dv). Then R query rows at a
// time: S = scale·(Q·Kᵀ) in R x NC register tiles (Q broadcast from its own rows), the
// row softmax in place (S stays in L1: R rows of ~Lk floats), then O = P·V in R x NC tiles and
// O / rowsum written out. Both products run one register tile shape, so both are FMA-bound:
// per reduction step NV loads and R broadcasts feed R·NV FMAs. The last key panel and the last
// value panel run only the vectors they need (Lk = 197 on 16-lane tiles: 208 columns computed,
// not 256).
//
// Non-finite scores: a row whose scores hold a NaN or an infinity takes an exact scalar path, so
// that it comes out as torch's SDPA has it: NaN for a NaN or a +inf score, weight 0 for a -inf
// score, and an output row of zeros when every score is -inf (SDPA's online softmax; the plain
// softmax would give NaN).

template <class V, int R, int NV>
struct AttentionKernel {
  using Reg = typename V::R;
  static constexpr int64_t L = V::kLanes;
  static constexpr int64_t NC = NV * L;

  static int64_t panels(int64_t n) { return (n + NC - 1) / NC; }
  static int64_t ld_s(const AttentionProblem& p) { return panels(p.Lk) * NC; }

  static int64_t scratch(const AttentionProblem& p) {
    return panels(p.Lk) * NC * p.D + panels(p.Dv) * NC * p.Lk + R * ld_s(p);
  }

  // c[r][0, NVV·L) = f · sum over k < kd of a[r·lda + k] · b[k·NC + .] for rows r < RR.
  template <int RR, int NVV>
  static void tile(const float* a, int64_t lda, const float* b, int64_t kd, float* c, int64_t ldc, float f) {
    Reg acc[RR][NVV];
    for (int r = 0; r < RR; ++r)
      for (int u = 0; u < NVV; ++u) acc[r][u] = V::zero();
    for (int64_t k = 0; k < kd; ++k) {
      Reg bv[NVV];
      for (int u = 0; u < NVV; ++u) bv[u] = V::load(b + k * NC + u * L);
      for (int r = 0; r < RR; ++r) {
        const Reg av = V::bcast(a + r * lda + k);
        for (int u = 0; u < NVV; ++u) acc[r][u] = V::fma(av, bv[u], acc[r][u]);
      }
    }
    const Reg fv = V::set1(f);
    for (int r = 0; r < RR; ++r)
      for (int u = 0; u < NVV; ++u) V::store(c + r * ldc + u * L, V::mul(acc[r][u], fv));
  }

  template <int RR>
  static void tile_nv(int64_t nvv, const float* a, int64_t lda, const float* b, int64_t kd, float* c, int64_t ldc,
                      float f) {
    if constexpr (NV >= 4) if (nvv == 4) return tile<RR, 4>(a, lda, b, kd, c, ldc, f);
    if constexpr (NV >= 3) if (nvv == 3) return tile<RR, 3>(a, lda, b, kd, c, ldc, f);
    if constexpr (NV >= 2) if (nvv == 2) return tile<RR, 2>(a, lda, b, kd, c, ldc, f);
    tile<RR, 1>(a, lda, b, kd, c, ldc, f);
  }

  static void tile_any(int64_t rr, int64_t nvv, const float* a, int64_t lda, const float* b, int64_t kd, float* c,
                       int64_t ldc, float f) {
    static_assert(R == 6, "tile_any dispatches 1..6 rows");
    switch (rr) {
      case 1: return tile_nv<1>(nvv, a, lda, b, kd, c, ldc, f);
      case 2: return tile_nv<2>(nvv, a, lda, b, kd, c, ldc, f);
      case 3: return tile_nv<3>(nvv, a, lda, b, kd, c, ldc, f);
      case 4: return tile_nv<4>(nvv, a, lda, b, kd, c, ldc, f);
      case 5: return tile_nv<5>(nvv, a, lda, b, kd, c, ldc, f);
      default: return tile_nv<6>(nvv, a, lda, b, kd, c, ldc, f);
    }
  }

  // The softmax numerators of s[0, n) in place (n >= 1); returns 1 / their sum.
  static float softmax_row(float* s, int64_t n) {
    const int64_t nf = n / L * L;
    const float neg_inf = -__builtin_inff();
    Reg mv = V::set1(neg_inf), z = V::zero();
    for (int64_t j = 0; j < nf; j += L) {
      const Reg x = V::load(s + j);
      mv = V::max(mv, x);
      z = V::add(z, V::mul(x, V::zero()));  // NaN iff some x is NaN or infinite
    }
    float m = V::hmax(mv), zs = V::hsum(z);
    for (int64_t j = nf; j < n; ++j) {
      m = s[j] > m ? s[j] : m;
      zs += s[j] * 0.0f;
    }
    if (zs != zs) return softmax_row_exact(s, n);
    const Reg mm = V::set1(m);
    Reg sum = V::zero();
    for (int64_t j = 0; j < nf; j += L) {
      const Reg e = V::exp_neg(V::sub(V::load(s + j), mm));
      V::store(s + j, e);
      sum = V::add(sum, e);
    }
    if (nf < n) {  // the tail through a lane buffer whose unused lanes give exp(-inf) = 0
      alignas(64) float buf[L];
      for (int64_t j = 0; j < L; ++j) buf[j] = nf + j < n ? s[nf + j] : neg_inf;
      const Reg e = V::exp_neg(V::sub(V::load(buf), mm));
      V::store(buf, e);
      sum = V::add(sum, e);
      for (int64_t j = nf; j < n; ++j) s[j] = buf[j - nf];
    }
    return 1.0f / V::hsum(sum);  // >= 1: the row's max gave exp(0)
  }

  // A row with a NaN or an infinity: max (NaN if any), exp(s - max), sum; every score -inf:
  // weights 0 and a zero output row, as torch's SDPA.
  static float softmax_row_exact(float* s, int64_t n) {
    float m = -__builtin_inff();
    bool nan = false;
    for (int64_t j = 0; j < n; ++j) {
      if (s[j] != s[j]) nan = true;
      else if (s[j] > m) m = s[j];
    }
    if (!nan && m == -__builtin_inff()) {
      for (int64_t j = 0; j < n; ++j) s[j] = 0.0f;
      return 0.0f;
    }
    if (nan) m = __builtin_nanf("");
    float sum = 0.0f;
    for (int64_t j = 0; j < n; ++j) {
      s[j] = __builtin_expf(s[j] - m);
      sum += s[j];
    }
    return 1.0f / sum;
  }

  static void task(const AttentionProblem& p, int64_t t, float* scratch) {
    const int64_t c = t % p.chunks, h = t / p.chunks % p.H, b = t / (p.chunks * p.H);
    const int64_t i0 = c * p.chunk_rows, i1 = i0 + p.chunk_rows < p.Lq ? i0 + p.chunk_rows : p.Lq;
    if (i0 >= i1) return;
    const float* q = p.q.data + b * p.q.sb + h * p.q.sh;
    const float* k = p.k.data + b * p.k.sb + h * p.k.sh;
    const float* v = p.v.data + b * p.v.sb + h * p.v.sh;
    float* out = p.out + b * p.ob + h * p.oh;
    const int64_t kpan = panels(p.Lk), vpan = panels(p.Dv), lds = ld_s(p);
    float* kp = scratch;                      // [kpan][D][NC]
    float* vp = kp + kpan * NC * p.D;         // [vpan][Lk][NC]
    float* s = vp + vpan * NC * p.Lk;         // [R][lds]
    for (int64_t pc = 0; pc < kpan; ++pc) {
      float* dst = kp + pc * p.D * NC;
      for (int64_t jj = 0; jj < NC; ++jj) {
        const int64_t j = pc * NC + jj;
        const float* row = k + j * p.k.sl;
        if (j < p.Lk) {
          for (int64_t d = 0; d < p.D; ++d) dst[d * NC + jj] = row[d];
        } else {
          for (int64_t d = 0; d < p.D; ++d) dst[d * NC + jj] = 0.0f;
        }
      }
    }
    for (int64_t pc = 0; pc < vpan; ++pc) {
      const int64_t c0 = pc * NC, w = p.Dv - c0 < NC ? p.Dv - c0 : NC;
      float* dst = vp + pc * p.Lk * NC;
      for (int64_t j = 0; j < p.Lk; ++j) {
        const float* row = v + j * p.v.sl + c0;
        for (int64_t jj = 0; jj < NC; ++jj) dst[j * NC + jj] = jj < w ? row[jj] : 0.0f;
      }
    }
    alignas(64) float o[R * NC];
    float inv[R];
    for (int64_t i = i0; i < i1; i += R) {
      const int64_t rr = i1 - i < R ? i1 - i : R;
      for (int64_t pc = 0; pc < kpan; ++pc) {
        const int64_t w = p.Lk - pc * NC < NC ? p.Lk - pc * NC : NC;
        tile_any(rr, (w + L - 1) / L, q + i * p.q.sl, p.q.sl, kp + pc * p.D * NC, p.D, s + pc * NC, lds,
                 p.scale);
      }
      for (int64_t r = 0; r < rr; ++r) inv[r] = softmax_row(s + r * lds, p.Lk);
      for (int64_t pc = 0; pc < vpan; ++pc) {
        const int64_t c0 = pc * NC, w = p.Dv - c0 < NC ? p.Dv - c0 : NC;
        tile_any(rr, (w + L - 1) / L, s, lds, vp + pc * p.Lk * NC, p.Lk, o, NC, 1.0f);
        for (int64_t r = 0; r < rr; ++r) {
          float* dst = out + (i + r) * p.ol + c0;
          const float* src = o + r * NC;
          const Reg f = V::set1(inv[r]);
          int64_t jj = 0;
          for (; jj + L <= w; jj += L) V::store(dst + jj, V::mul(V::load(src + jj), f));
          for (; jj < w; ++jj) dst[jj] = src[jj] * inv[r];
        }
      }
    }
  }
};

#define SPARSE_PRUNE_ATTENTION_ENTRY_POINTS(K)                                                  \
  int64_t attention_scratch(const AttentionProblem& p) { return K::scratch(p); }                \
  void attention_tasks(const AttentionProblem& p, int64_t t0, int64_t t1, float* scratch) {     \
    for (int64_t t = t0; t < t1; ++t) K::task(p, t, scratch);                                   \
  }
