// The loop nest every ISA shares, over a micro-kernel policy `Mi` (spmm_avx2.cpp,
// spmm_portable.cpp). Included by each ISA unit inside its own anonymous namespace, so every
// function here has internal linkage there and nothing compiled with AVX2 leaks to others.
//
// Loop order per worker (rows [r0, r1), split by nonzeros by the caller):
//   for each token tile t:            (panel t: Xᵀ of `tile` tokens, kp x tile)
//     for each K-block b:             (kblock columns of the panel: ~24 KiB, stays in L1)
//       for each row r:  yt[r] (+)= Σ_{nonzeros of row r in block b} w · panel[col]
//     epilogue: Y[t·tile + j, r] = act(yt[r][j] + bias[r])  (transposed in 8x8 blocks)
// K-blocking keeps the panel slice in L1; without it a measured 50% fc1 ran below dense.
//
// Requires the caller's Problem to be consistent (tile a multiple of kLanes, kblock > 0, crow
// validated); column indices are checked here, while the K-block boundaries are found.

template <class Mi, typename T, typename I>
int csr_rows_impl(const Problem& p, const CsrWeight& w, const T* xp, int64_t r0, int64_t r1,
                  T* yt, int64_t* bounds) {
  const T* val = static_cast<const T*>(w.values);
  const I* col = static_cast<const I*>(w.col);
  const int64_t rows = r1 - r0;
  const int64_t nkb = (p.K + p.kblock - 1) / p.kblock;
  const int64_t stride = nkb + 1;
  for (int64_t r = 0; r < rows; ++r) {
    int64_t q = w.crow[r0 + r];
    const int64_t end = w.crow[r0 + r + 1];
    int64_t prev = -1;
    int64_t* b = bounds + r * stride;
    b[0] = q;
    for (int64_t k = 1; k <= nkb; ++k) {
      const int64_t lim = k * p.kblock < p.K ? k * p.kblock : p.K;
      while (q < end) {
        const int64_t c = static_cast<int64_t>(col[q]);
        if (c >= lim) break;
        if (c < 0) return kColOutOfRange;
        if (c <= prev) return kColUnsorted;
        prev = c;
        ++q;
      }
      b[k] = q;
    }
    if (q != end) {
      return static_cast<int64_t>(col[q]) < 0 ? kColOutOfRange
             : static_cast<int64_t>(col[q]) <= prev ? kColUnsorted : kColOutOfRange;
    }
  }
  const int64_t V = p.tile / kLanes;
  for (int64_t t = 0; t < p.ntiles; ++t) {
    const T* panel = xp + t * p.kp * p.tile;
    if (nkb == 0) Mi::zero(yt, rows * p.tile);
    for (int64_t k = 0; k < nkb; ++k) {
      for (int64_t r = 0; r < rows; ++r) {
        const int64_t* b = bounds + r * stride;
        T* out = yt + r * p.tile;
        switch (V) {
          case 1: Mi::template csr_seg<1, I>(panel, p.tile, val, col, b[k], b[k + 1], out, k == 0); break;
          case 2: Mi::template csr_seg<2, I>(panel, p.tile, val, col, b[k], b[k + 1], out, k == 0); break;
          case 3: Mi::template csr_seg<3, I>(panel, p.tile, val, col, b[k], b[k + 1], out, k == 0); break;
          case 4: Mi::template csr_seg<4, I>(panel, p.tile, val, col, b[k], b[k + 1], out, k == 0); break;
          case 5: Mi::template csr_seg<5, I>(panel, p.tile, val, col, b[k], b[k + 1], out, k == 0); break;
          default: Mi::template csr_seg<6, I>(panel, p.tile, val, col, b[k], b[k + 1], out, k == 0); break;
        }
      }
    }
    Mi::epilogue(p, yt, t, r0, r1);
  }
  return kOk;
}

template <class Mi, typename T, typename I>
int bsr_rows_impl(const Problem& p, const BsrWeight& w, const T* xp, int64_t b0, int64_t b1,
                  T* yt, int64_t* bounds) {
  const T* val = static_cast<const T*>(w.values);
  const I* col = static_cast<const I*>(w.col);
  const int64_t bm = w.bm, bk = w.bk;
  const int64_t ncols = p.kp / bk;                 // block columns
  const int64_t per_kb = p.kblock / bk > 0 ? p.kblock / bk : 1;
  const int64_t nkb = (ncols + per_kb - 1) / per_kb;
  const int64_t stride = nkb + 1;
  const int64_t r0 = b0 * bm;
  const int64_t r1 = b1 * bm < p.N ? b1 * bm : p.N;
  for (int64_t br = 0; br < b1 - b0; ++br) {
    int64_t q = w.crow[b0 + br];
    const int64_t end = w.crow[b0 + br + 1];
    int64_t prev = -1;
    int64_t* b = bounds + br * stride;
    b[0] = q;
    for (int64_t k = 1; k <= nkb; ++k) {
      const int64_t lim = k * per_kb < ncols ? k * per_kb : ncols;
      while (q < end) {
        const int64_t c = static_cast<int64_t>(col[q]);
        if (c >= lim) break;
        if (c < 0) return kColOutOfRange;
        if (c <= prev) return kColUnsorted;
        prev = c;
        ++q;
      }
      b[k] = q;
    }
    if (q != end) return static_cast<int64_t>(col[q]) <= prev ? kColUnsorted : kColOutOfRange;
  }
  const int64_t V = p.tile / kLanes;
  const int64_t rows = r1 - r0;
  for (int64_t t = 0; t < p.ntiles; ++t) {
    const T* panel = xp + t * p.kp * p.tile;
    if (nkb == 0) Mi::zero(yt, rows * p.tile);
    for (int64_t k = 0; k < nkb; ++k) {
      for (int64_t br = 0; br < b1 - b0; ++br) {
        const int64_t* b = bounds + br * stride;
        const int64_t base = (b0 + br) * bm;
        const int64_t nrows = base + bm <= p.N ? bm : p.N - base;
        T* out = yt + (base - r0) * p.tile;
        switch (V) {
          case 1: Mi::template bsr_seg<1, I>(panel, p.tile, val, bm, bk, nrows, col, b[k], b[k + 1], out, k == 0); break;
          case 2: Mi::template bsr_seg<2, I>(panel, p.tile, val, bm, bk, nrows, col, b[k], b[k + 1], out, k == 0); break;
          case 3: Mi::template bsr_seg<3, I>(panel, p.tile, val, bm, bk, nrows, col, b[k], b[k + 1], out, k == 0); break;
          case 4: Mi::template bsr_seg<4, I>(panel, p.tile, val, bm, bk, nrows, col, b[k], b[k + 1], out, k == 0); break;
          case 5: Mi::template bsr_seg<5, I>(panel, p.tile, val, bm, bk, nrows, col, b[k], b[k + 1], out, k == 0); break;
          default: Mi::template bsr_seg<6, I>(panel, p.tile, val, bm, bk, nrows, col, b[k], b[k + 1], out, k == 0); break;
        }
      }
    }
    Mi::epilogue(p, yt, t, r0, r1);
  }
  return kOk;
}

template <class Mi, typename T>
int semi24_rows_impl(const Problem& p, const Semi24Weight& w, const T* xp, int64_t r0, int64_t r1,
                     T* yt) {
  const T* val = static_cast<const T*>(w.values);
  const int64_t groups = p.K / 4;
  const int64_t per_kb = p.kblock / 4;  // kblock is a multiple of 16: whole metadata words
  const int64_t nkb = (groups + per_kb - 1) / per_kb;
  const int64_t rows = r1 - r0;
  const int64_t V = p.tile / kLanes;
  for (int64_t t = 0; t < p.ntiles; ++t) {
    const T* panel = xp + t * p.kp * p.tile;
    if (nkb == 0) Mi::zero(yt, rows * p.tile);
    for (int64_t k = 0; k < nkb; ++k) {
      const int64_t g0 = k * per_kb;
      const int64_t g1 = g0 + per_kb < groups ? g0 + per_kb : groups;
      for (int64_t r = 0; r < rows; ++r) {
        const T* v = val + (r0 + r) * (p.K / 2);
        const int16_t* m = w.meta + (r0 + r) * w.meta_cols;
        T* out = yt + r * p.tile;
        switch (V) {
          case 1: Mi::template semi_seg<1>(panel, p.tile, v, m, g0, g1, out, k == 0); break;
          case 2: Mi::template semi_seg<2>(panel, p.tile, v, m, g0, g1, out, k == 0); break;
          case 3: Mi::template semi_seg<3>(panel, p.tile, v, m, g0, g1, out, k == 0); break;
          case 4: Mi::template semi_seg<4>(panel, p.tile, v, m, g0, g1, out, k == 0); break;
          case 5: Mi::template semi_seg<5>(panel, p.tile, v, m, g0, g1, out, k == 0); break;
          default: Mi::template semi_seg<6>(panel, p.tile, v, m, g0, g1, out, k == 0); break;
        }
      }
    }
    Mi::epilogue(p, yt, t, r0, r1);
  }
  return kOk;
}

template <class Mi, typename T>
int csr_dispatch(const Problem& p, const CsrWeight& w, const T* xp, int64_t r0, int64_t r1, T* yt,
                 int64_t* bounds) {
  switch (w.index_bytes) {
    case 2: return csr_rows_impl<Mi, T, int16_t>(p, w, xp, r0, r1, yt, bounds);
    case 8: return csr_rows_impl<Mi, T, int64_t>(p, w, xp, r0, r1, yt, bounds);
    default: return csr_rows_impl<Mi, T, int32_t>(p, w, xp, r0, r1, yt, bounds);
  }
}

template <class Mi, typename T>
int bsr_dispatch(const Problem& p, const BsrWeight& w, const T* xp, int64_t b0, int64_t b1, T* yt,
                 int64_t* bounds) {
  switch (w.index_bytes) {
    case 2: return bsr_rows_impl<Mi, T, int16_t>(p, w, xp, b0, b1, yt, bounds);
    case 8: return bsr_rows_impl<Mi, T, int64_t>(p, w, xp, b0, b1, yt, bounds);
    default: return bsr_rows_impl<Mi, T, int32_t>(p, w, xp, b0, b1, yt, bounds);
  }
}

// Unpack the two in-group columns of group g from a 2:4 metadata row.
inline void semi24_columns(const int16_t* meta, int64_t g, int64_t& c0, int64_t& c1) {
  const unsigned word = static_cast<uint16_t>(meta[g >> 2]);
  const unsigned nib = (word >> ((g & 3) * 4)) & 0xFu;
  c0 = 4 * g + (nib & 3u);
  c1 = 4 * g + ((nib >> 2) & 3u);
}
