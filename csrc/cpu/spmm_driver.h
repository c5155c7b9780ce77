// The loop nest every ISA shares, over a micro-kernel policy `Mi` (spmm_avx2.cpp,
// spmm_portable.cpp). Included by each ISA unit inside its own anonymous namespace, so every
// function here has internal linkage there and nothing compiled with AVX2 leaks to others.
//
// Loop order per worker (rows [r0, r1), split by nonzeros by the caller):
//   for each group of token tiles      (panels of about p.panel_budget bytes: stay in L2)
//     for each block of rows            (stored weights of about p.weight_budget bytes: L2)
//       for each token tile t of the group (panel t: Xᵀ of its tokens, kp x width)
//         for each K-block b            (kblock columns of the panel: ~24 KiB in L1 for dense
//                                        rows, wider for sparse ones: see plan() in cpu_ops.cpp)
//           for each row r of the block:  yt[r] (+)= Σ_{stored w of row r in b} w · panel[col]
//         epilogue: Y[t·tile + j, r] = act(yt[r][j] + bias[r])  (transposed in 8x8 blocks)
// Measured on fc1 (3072x768, M = 197, 50%): streaming the whole weight once per token tile
// (no row blocks) held the kernel to ~30% of one core's FMA peak; K-blocking keeps the panel
// slice in L1 and the row blocks keep the weight (and the Yᵀ tile) in cache across tiles.
//
// Requires the caller's Problem to be consistent (tile widths multiples of Mi::kLanes, kblock
// > 0, crow validated); column indices are checked here, while the K-block boundaries are found.

template <int N>
struct VecCount {
  static constexpr int value = N;
};

// f(VecCount<V>) for the run-time vector count v (1 <= v <= Mi::kMaxV): one instantiation of
// the micro-kernel per register tile, as XNNPACK generates one per tile size.
template <int N, class F>
inline void with_vectors(int64_t v, F&& f) {
  if constexpr (N > 1) {
    if (v >= N) {
      f(VecCount<N>{});
      return;
    }
    with_vectors<N - 1>(v, f);
  } else {
    f(VecCount<1>{});
  }
}

// Tokens in tile t: every tile is p.tile wide but the last (p.last_tile).
inline int64_t tile_width(const Problem& p, int64_t t) { return t + 1 == p.ntiles ? p.last_tile : p.tile; }

// The epilogue of rows [r0, r1) of tile t: into Y, or into the next layer's panels.
template <class Mi, typename T>
inline void emit(const Problem& p, const T* yt, int64_t t, int64_t r0, int64_t r1) {
  if (p.y_panels) Mi::to_panels(p, yt, t, r0, r1); else Mi::epilogue(p, yt, t, r0, r1);
}

// body(t, u0, u1) for every (tile group, block of units, tile of the group), in that nesting:
// units (rows, or bsr block rows) [ub, ue) are cut into blocks whose bytes(u0, u1) stay within
// p.weight_budget (at least one unit each), tiles into groups of about p.panel_budget bytes.
template <typename T, class Bytes, class Body>
inline void for_blocks(const Problem& p, int64_t ub, int64_t ue, Bytes bytes, Body body) {
  const int64_t panel = p.kp * p.tile * static_cast<int64_t>(sizeof(T));
  const int64_t group = panel > 0 && p.panel_budget / panel > 0 ? p.panel_budget / panel : 1;
  for (int64_t g0 = 0; g0 < p.ntiles; g0 += group) {
    const int64_t g1 = g0 + group < p.ntiles ? g0 + group : p.ntiles;
    for (int64_t u0 = ub; u0 < ue;) {
      int64_t u1 = u0 + 1;
      while (u1 < ue && bytes(u0, u1 + 1) <= p.weight_budget) ++u1;
      for (int64_t t = g0; t < g1; ++t) body(t, u0, u1);
      u0 = u1;
    }
  }
}


// kOk when col[begin..end) is strictly increasing within [0, limit), else the status code:
// one branch-free pass for the order (an OR reduction the compiler vectorizes; the bool version
// was not, and cost 6% of a 90% fc1 product), then the range from the first and last entries.
template <typename I>
inline int check_sorted_range(const I* col, int64_t begin, int64_t end, int64_t limit) {
  if (end <= begin) return kOk;
  int unsorted = 0;
  for (int64_t q = begin + 1; q < end; ++q) unsorted |= static_cast<int>(col[q] <= col[q - 1]);
  if (unsorted) return kColUnsorted;
  return static_cast<int64_t>(col[begin]) >= 0 && static_cast<int64_t>(col[end - 1]) < limit ? kOk : kColOutOfRange;
}

// b[k] = first q in [begin, end) with col[q] >= k·span (k = 0..nkb; b[nkb] = end) on a sorted
// row. Rows of up to 1024 entries count the entries below each boundary (a compare-and-add the
// compiler vectorizes, no branch); longer ones binary-search, log2(row length) steps per
// K-block. Counting replaced a binary search whose steps mispredicted about half the time:
// it was most of the per-call index pass at 50-70% density (perf).
template <typename I>
inline void find_bounds(const I* col, int64_t begin, int64_t end, int64_t span, int64_t nkb, int64_t* b) {
  b[0] = begin;
  const int64_t n = end - begin;
  int64_t lo = begin;
  for (int64_t k = 1; k < nkb; ++k) {
    const int64_t lim = k * span;
    const I narrow = static_cast<I>(lim);
    if (n <= 1024 && static_cast<int64_t>(narrow) == lim) {
      int count = 0;
      for (int64_t q = begin; q < end; ++q) count += static_cast<int>(col[q] < narrow);
      b[k] = begin + count;
      continue;
    }
    int64_t hi = end;
    while (lo < hi) {
      const int64_t mid = lo + (hi - lo) / 2;
      if (static_cast<int64_t>(col[mid]) < lim) lo = mid + 1; else hi = mid;
    }
    b[k] = lo;
  }
  if (nkb > 0) b[nkb] = end;
}

// K-blocks of a csr row on plan p (kp = K for csr): bounds_stride(p) - 1.
inline int64_t csr_kblocks(const Problem& p) { return (p.kp + p.kblock - 1) / p.kblock; }

// The K-block geometry of a bsr weight with blocks bk wide on plan p.
struct BsrKBlocks {
  int64_t ncols, per_kb, nkb;  // block columns, block columns per K-block, K-blocks
  BsrKBlocks(const Problem& p, int64_t bk)
      : ncols(p.kp / bk), per_kb(p.kblock / bk > 0 ? p.kblock / bk : 1), nkb((ncols + per_kb - 1) / per_kb) {}
};

// The index pass of rows [r0, r1): checks their column indices and finds their K-block bounds,
// row r0 + r's at bounds + r·(nkb + 1). Returns a status code.
template <typename I>
int csr_index_impl(const Problem& p, const CsrWeight& w, int64_t r0, int64_t r1, int64_t* bounds) {
  const I* col = static_cast<const I*>(w.col);
  const int64_t nkb = csr_kblocks(p);
  const int64_t stride = nkb + 1;
  for (int64_t r = 0; r < r1 - r0; ++r) {
    const int64_t begin = w.crow[r0 + r], end = w.crow[r0 + r + 1];
    const int status = check_sorted_range(col, begin, end, p.K);
    if (status != kOk) return status;
    find_bounds(col, begin, end, p.kblock, nkb, bounds + r * stride);
  }
  return kOk;
}

// indexed: csr_index_impl has already run on these rows with this p.kblock (into bounds).
template <class Mi, typename T, typename I>
int csr_rows_impl(const Problem& p, const CsrWeight& w, const T* xp, int64_t r0, int64_t r1,
                  T* yt, int64_t* bounds, bool indexed) {
  const T* val = static_cast<const T*>(w.values);
  const I* col = static_cast<const I*>(w.col);
  const int64_t rows = r1 - r0;
  const int64_t nkb = csr_kblocks(p);
  const int64_t stride = nkb + 1;
  if (!indexed) {
    const int status = csr_index_impl<I>(p, w, r0, r1, bounds);
    if (status != kOk) return status;
  }
  const auto bytes = [&](int64_t u0, int64_t u1) {
    return (w.crow[r0 + u1] - w.crow[r0 + u0]) * static_cast<int64_t>(sizeof(T) + sizeof(I)) + (u1 - u0) * 64;
  };
  for_blocks<T>(p, 0, rows, bytes, [&](int64_t t, int64_t u0, int64_t u1) {
    const T* panel = xp + t * p.kp * p.tile;
    const int64_t width = tile_width(p, t);
    if (nkb == 0) Mi::zero(yt, (u1 - u0) * p.tile);
    with_vectors<Mi::kMaxV>(width / Mi::kLanes, [&](auto v) {
      constexpr int V = decltype(v)::value;
      for (int64_t k = 0; k < nkb; ++k) {
        for (int64_t r = u0; r < u1; ++r) {
          const int64_t* b = bounds + r * stride;
          Mi::template csr_seg<V, I>(panel, width, val, col, b[k], b[k + 1], yt + (r - u0) * p.tile, k == 0);
        }
      }
    });
    emit<Mi>(p, yt, t, r0 + u0, r0 + u1);
  });
  return kOk;
}

// The segment kernel (CsrSegments, float32): row blocks [rb0, rb1) over every tile. Per tile
// group, row block and tile (a panel larger than the rows' Yᵀ: per tile, sub-block and row
// block), the block's Yᵀ rows (rows_per_block x width, in L1; in L2 for sub-blocks outer) take
// each sub-block's segments in their stored order: a panel sub-block of `span` columns stays in L1
// while the block's weights stream contiguously, and the segments, sorted (segments.cpp), end
// where the branch predictor expects them. Two rows run together (Mi::csr_shared: two independent
// chains; the columns both keep load each Xᵀ vector once for both). The row-by-row CSR loop
// with its K-blocks, measured in a standalone loop (one core, AVX-512, 112-token tiles, fc1
// 3072x768): 3.0 against 2.3 zmm FMAs/ns at 90% sparse and 3.6 against 1.9 at 50% for the
// segments (then paired by length only); unsorted, the segments ran at 2.2.
// Each row's sum runs in a fixed order (a sum per sub-block, in turn, added to the row's; a
// segment's accumulator sets as the layout and Mi have them), so the result does not depend on
// the tiles or the split.
template <class Mi>
void csr_segs_impl(const Problem& p, const CsrSegments& w, const float* xp, int64_t rb0, int64_t rb1, float* yt) {
  const int64_t R = w.rows_per_block;
  const int64_t panel_bytes = p.kp * p.tile * static_cast<int64_t>(sizeof(float));
  const int64_t group = panel_bytes > 0 && p.panel_budget / panel_bytes > 0 ? p.panel_budget / panel_bytes : 1;
  // The segments of row block rb in sub-block s on tile t (width floats), Yᵀ row r at
  // y + (r - y_row0)·tile.
  const auto run_block = [&](auto v, int64_t t, int64_t width, int64_t rb, int64_t s, float* y, int64_t y_row0) {
    constexpr int V = decltype(v)::value;
    const int64_t b = rb * w.nsb + s;
    const float* panel = xp + t * p.kp * p.tile + s * w.span * width;  // the sub-block's columns
    int64_t q = w.block_val[b], c = w.block_col[b];
    for (int64_t i = w.block_seg[b]; i < w.block_seg[b + 1]; ++i) {
      const SegmentHead h = w.seg[i];
      float* y0 = y + (h.row0 - y_row0) * p.tile;  // Yᵀ rows are p.tile apart (emit)
      if (h.row1 < 0) {
        Mi::template csr_lone<V>(panel, width, w.values + q, w.col + c, h.tail, y0, s == 0);
      } else {
        Mi::template csr_shared<V>(panel, width, w.values + q, w.col + c, h.shared, h.paired, h.tail, y0,
                                   y + (h.row1 - y_row0) * p.tile, s == 0);
      }
      q += 2 * static_cast<int64_t>(h.shared) + 2 * static_cast<int64_t>(h.paired) + h.tail;
      c += static_cast<int64_t>(h.shared) + 2 * static_cast<int64_t>(h.paired) + h.tail;
    }
  };
  const int64_t first_row = rb0 * R, last_row = rb1 * R < p.N ? rb1 * R : p.N;
  // Sub-blocks outer when a tile's panel outweighs the Yᵀ rows of [rb0, rb1) (fc2: K = 3072
  // against 768 rows): each panel sub-block is read once for every row block, the Yᵀ rows
  // staying in L2, instead of the whole panel streamed once per row block (a 40-token fc2 panel
  // is 480 KiB: more than Zen 3's 512 KiB L2 holds beside the rest). Measured with the panel
  // past L2 (Zen 4, 1 MiB L2, AVX2, 768x12288, one process, 15 rounds): 1.07x at 70% sparse,
  // 1.11x at 90%; fc2 there, whose panel fits its L2: 1.07x and 0.98x. Each row's sum is formed
  // in the same order either way.
  const bool columns_outer = rb1 - rb0 > 1 && p.kp > last_row - first_row;
  for (int64_t g0 = 0; g0 < p.ntiles; g0 += group) {
    const int64_t g1 = g0 + group < p.ntiles ? g0 + group : p.ntiles;
    if (columns_outer) {
      for (int64_t t = g0; t < g1; ++t) {
        const int64_t width = tile_width(p, t);
        with_vectors<Mi::kMaxV>(width / Mi::kLanes, [&](auto v) {
          for (int64_t s = 0; s < w.nsb; ++s)
            for (int64_t rb = rb0; rb < rb1; ++rb) run_block(v, t, width, rb, s, yt, first_row);
        });
        emit<Mi>(p, yt, t, first_row, last_row);
      }
      continue;
    }
    for (int64_t rb = rb0; rb < rb1; ++rb) {
      const int64_t row0 = rb * R, row1 = row0 + R < p.N ? row0 + R : p.N;
      for (int64_t t = g0; t < g1; ++t) {
        const int64_t width = tile_width(p, t);
        if (w.nsb == 0) Mi::zero(yt, (row1 - row0) * p.tile);
        with_vectors<Mi::kMaxV>(width / Mi::kLanes, [&](auto v) {
          for (int64_t s = 0; s < w.nsb; ++s) run_block(v, t, width, rb, s, yt, row0);
        });
        emit<Mi>(p, yt, t, row0, row1);
      }
    }
  }
}

// The index pass of block rows [b0, b1) (csr_index_impl's contract), with the padding check.
template <typename T, typename I>
int bsr_index_impl(const Problem& p, const BsrWeight& w, int64_t b0, int64_t b1, int64_t* bounds) {
  const T* val = static_cast<const T*>(w.values);
  const I* col = static_cast<const I*>(w.col);
  const int64_t bm = w.bm, bk = w.bk;
  const BsrKBlocks kb(p, bk);
  const int64_t ncols = kb.ncols, stride = kb.nkb + 1;
  const int64_t pad = p.kp - p.K;  // columns of the last block column past K
  for (int64_t br = 0; br < b1 - b0; ++br) {
    const int64_t begin = w.crow[b0 + br], end = w.crow[b0 + br + 1];
    const int status = check_sorted_range(col, begin, end, ncols);
    if (status != kOk) return status;
    // Padding must be 0: it meets the panel's zero rows, and 0·inf would be NaN where the
    // reference (which crops the padding) is finite.
    if (pad > 0 && end > begin && static_cast<int64_t>(col[end - 1]) == ncols - 1) {
      const T* blk = val + (end - 1) * bm * bk;
      for (int64_t i = 0; i < bm; ++i)
        for (int64_t j = bk - pad; j < bk; ++j)
          if (blk[i * bk + j] != T(0)) return kPaddingNonZero;
    }
    find_bounds(col, begin, end, kb.per_kb, kb.nkb, bounds + br * stride);
  }
  return kOk;
}

template <class Mi, typename T, typename I>
int bsr_rows_impl(const Problem& p, const BsrWeight& w, const T* xp, int64_t b0, int64_t b1,
                  T* yt, int64_t* bounds, bool indexed) {
  const T* val = static_cast<const T*>(w.values);
  const I* col = static_cast<const I*>(w.col);
  const int64_t bm = w.bm, bk = w.bk;
  const int64_t nkb = BsrKBlocks(p, bk).nkb;
  const int64_t stride = nkb + 1;
  if (!indexed) {
    const int status = bsr_index_impl<T, I>(p, w, b0, b1, bounds);
    if (status != kOk) return status;
  }
  const auto bytes = [&](int64_t u0, int64_t u1) {
    return (w.crow[b0 + u1] - w.crow[b0 + u0]) * static_cast<int64_t>(bm * bk * sizeof(T) + sizeof(I)) +
           (u1 - u0) * bm * 64;
  };
  for_blocks<T>(p, 0, b1 - b0, bytes, [&](int64_t t, int64_t u0, int64_t u1) {
    const T* panel = xp + t * p.kp * p.tile;
    const int64_t width = tile_width(p, t);
    const int64_t ya = (b0 + u0) * bm;
    const int64_t yb = (b0 + u1) * bm < p.N ? (b0 + u1) * bm : p.N;
    if (nkb == 0) Mi::zero(yt, (yb - ya) * p.tile);
    with_vectors<Mi::kMaxV>(width / Mi::kLanes, [&](auto v) {
      constexpr int V = decltype(v)::value;
      for (int64_t k = 0; k < nkb; ++k) {
        for (int64_t br = u0; br < u1; ++br) {
          const int64_t* b = bounds + br * stride;
          const int64_t base = (b0 + br) * bm;
          const int64_t nrows = base + bm <= p.N ? bm : p.N - base;
          Mi::template bsr_seg<V, I>(panel, width, p.tile, val, bm, bk, nrows, col, b[k], b[k + 1],
                                     yt + (base - ya) * p.tile, k == 0);
        }
      }
    });
    emit<Mi>(p, yt, t, ya, yb);
  });
  return kOk;
}

// ok[b] = 1 when both nibbles of byte b are valid 2:4 groups: two increasing columns, i.e.
// nibble 4, 8, 9, 12, 13 or 14 (bits [1:0] = first column, [3:2] = second).
struct MetaByteTable {
  unsigned char ok[256];
};

constexpr MetaByteTable make_meta_byte_table() {
  constexpr unsigned valid = (1u << 4) | (1u << 8) | (1u << 9) | (1u << 12) | (1u << 13) | (1u << 14);
  MetaByteTable t{};
  for (unsigned b = 0; b < 256; ++b) t.ok[b] = static_cast<unsigned char>((valid >> (b & 15u)) & (valid >> (b >> 4)) & 1u);
  return t;
}

constexpr MetaByteTable kMetaByteOk = make_meta_byte_table();

// The metadata check of rows [r0, r1): every group's nibble must name two increasing columns.
inline int semi24_check_impl(const Problem& p, const Semi24Weight& w, int64_t r0, int64_t r1) {
  const int64_t groups = p.K / 4;
  // Every group's nibble must name two increasing columns (docs/semi_structured_layout.md),
  // checked a byte (two groups) per table lookup on the worker's rows; the unused nibbles of a
  // last, partial word are ignored.
  const int64_t full_words = groups / 4;
  const unsigned tail_groups = static_cast<unsigned>(groups % 4);
  const unsigned tail_mask = (1u << (4 * tail_groups)) - 1u;
  for (int64_t r = r0; r < r1; ++r) {
    const int16_t* m = w.meta + r * w.meta_cols;
    unsigned ok = 1;
    for (int64_t i = 0; i < full_words; ++i) {
      const unsigned word = static_cast<uint16_t>(m[i]);
      ok &= kMetaByteOk.ok[word & 0xFFu] & kMetaByteOk.ok[word >> 8];
    }
    if (tail_groups) {  // fill the unused nibbles with a valid one (0b0100: columns 0, 1)
      const unsigned word = (static_cast<uint16_t>(m[full_words]) & tail_mask) | (0x4444u & ~tail_mask);
      ok &= kMetaByteOk.ok[word & 0xFFu] & kMetaByteOk.ok[word >> 8];
    }
    if (!ok) return kBadMeta;
  }
  return kOk;
}

// checked: semi24_check_impl has already passed these rows.
template <class Mi, typename T>
int semi24_rows_impl(const Problem& p, const Semi24Weight& w, const T* xp, int64_t r0, int64_t r1,
                     T* yt, bool checked) {
  const T* val = static_cast<const T*>(w.values);
  const int64_t groups = p.K / 4;
  const int64_t per_kb = p.kblock / 4;  // kblock is a multiple of 16: whole metadata words
  const int64_t nkb = (groups + per_kb - 1) / per_kb;
  const int64_t rows = r1 - r0;
  if (!checked) {
    const int status = semi24_check_impl(p, w, r0, r1);
    if (status != kOk) return status;
  }
  const int64_t row_bytes = (p.K / 2) * static_cast<int64_t>(sizeof(T)) + w.meta_cols * 2 + 64;
  const auto bytes = [&](int64_t u0, int64_t u1) { return (u1 - u0) * row_bytes; };
  for_blocks<T>(p, 0, rows, bytes, [&](int64_t t, int64_t u0, int64_t u1) {
    const T* panel = xp + t * p.kp * p.tile;
    const int64_t width = tile_width(p, t);
    if (nkb == 0) Mi::zero(yt, (u1 - u0) * p.tile);
    with_vectors<Mi::kMaxV>(width / Mi::kLanes, [&](auto vc) {
      constexpr int V = decltype(vc)::value;
      for (int64_t k = 0; k < nkb; ++k) {
        const int64_t g0 = k * per_kb;
        const int64_t g1 = g0 + per_kb < groups ? g0 + per_kb : groups;
        for (int64_t r = u0; r < u1; ++r) {
          Mi::template semi_seg<V>(panel, width, val + (r0 + r) * (p.K / 2), w.meta + (r0 + r) * w.meta_cols,
                                   g0, g1, yt + (r - u0) * p.tile, k == 0);
        }
      }
    });
    emit<Mi>(p, yt, t, r0 + u0, r0 + u1);
  });
  return kOk;
}

template <class Mi, typename T>
int csr_dispatch(const Problem& p, const CsrWeight& w, const T* xp, int64_t r0, int64_t r1, T* yt,
                 int64_t* bounds, bool indexed) {
  switch (w.index_bytes) {
    case 2: return csr_rows_impl<Mi, T, int16_t>(p, w, xp, r0, r1, yt, bounds, indexed);
    case 8: return csr_rows_impl<Mi, T, int64_t>(p, w, xp, r0, r1, yt, bounds, indexed);
    default: return csr_rows_impl<Mi, T, int32_t>(p, w, xp, r0, r1, yt, bounds, indexed);
  }
}

inline int csr_index_dispatch(const Problem& p, const CsrWeight& w, int64_t r0, int64_t r1, int64_t* bounds) {
  switch (w.index_bytes) {
    case 2: return csr_index_impl<int16_t>(p, w, r0, r1, bounds);
    case 8: return csr_index_impl<int64_t>(p, w, r0, r1, bounds);
    default: return csr_index_impl<int32_t>(p, w, r0, r1, bounds);
  }
}

template <class Mi, typename T>
int bsr_dispatch(const Problem& p, const BsrWeight& w, const T* xp, int64_t b0, int64_t b1, T* yt,
                 int64_t* bounds, bool indexed) {
  switch (w.index_bytes) {
    case 2: return bsr_rows_impl<Mi, T, int16_t>(p, w, xp, b0, b1, yt, bounds, indexed);
    case 8: return bsr_rows_impl<Mi, T, int64_t>(p, w, xp, b0, b1, yt, bounds, indexed);
    default: return bsr_rows_impl<Mi, T, int32_t>(p, w, xp, b0, b1, yt, bounds, indexed);
  }
}

template <typename T>
int bsr_index_dispatch(const Problem& p, const BsrWeight& w, int64_t b0, int64_t b1, int64_t* bounds) {
  switch (w.index_bytes) {
    case 2: return bsr_index_impl<T, int16_t>(p, w, b0, b1, bounds);
    case 8: return bsr_index_impl<T, int64_t>(p, w, b0, b1, bounds);
    default: return bsr_index_impl<T, int32_t>(p, w, b0, b1, bounds);
  }
}

// Unpack the two in-group columns of group g from a 2:4 metadata row.
inline void semi24_columns(const int16_t* meta, int64_t g, int64_t& c0, int64_t& c1) {
  const unsigned word = static_cast<uint16_t>(meta[g >> 2]);
  const unsigned nib = (word >> ((g & 3) * 4)) & 0xFu;
  c0 = 4 * g + (nib & 3u);
  c1 = 4 * g + ((nib >> 2) & 3u);
}

// The entry points of an ISA unit (spmm.h's API), for micro-kernel policy Mi over type T;
// expanded by each unit inside its own ISA namespace, outside the anonymous one.
#define SPARSE_PRUNE_ENTRY_POINTS(Mi, T)                                                                     \
  void pack_x(const Problem& p, const T* x, T* xp, int64_t t0, int64_t t1) {                               \
    for (int64_t t = t0; t < t1; ++t) Mi::pack(p, x, xp, t);                                               \
  }                                                                                                        \
  int csr_index(const Problem& p, const CsrWeight& w, int64_t r0, int64_t r1, int64_t* bounds) {           \
    return csr_index_dispatch(p, w, r0, r1, bounds);                                                       \
  }                                                                                                        \
  int csr_rows(const Problem& p, const CsrWeight& w, const T* xp, int64_t r0, int64_t r1, T* yt,           \
               int64_t* bounds, bool indexed) {                                                            \
    return csr_dispatch<Mi, T>(p, w, xp, r0, r1, yt, bounds, indexed);                                     \
  }                                                                                                        \
  int bsr_index(const Problem& p, const BsrWeight& w, int64_t b0, int64_t b1, int64_t* bounds) {           \
    return bsr_index_dispatch<T>(p, w, b0, b1, bounds);                                                    \
  }                                                                                                        \
  int bsr_rows(const Problem& p, const BsrWeight& w, const T* xp, int64_t b0, int64_t b1, T* yt,           \
               int64_t* bounds, bool indexed) {                                                            \
    return bsr_dispatch<Mi, T>(p, w, xp, b0, b1, yt, bounds, indexed);                                     \
  }                                                                                                        \
  int semi24_check(const Problem& p, const Semi24Weight& w, int64_t r0, int64_t r1) {                      \
    return semi24_check_impl(p, w, r0, r1);                                                                \
  }                                                                                                        \
  int semi24_rows(const Problem& p, const Semi24Weight& w, const T* xp, int64_t r0, int64_t r1, T* yt,     \
                  bool checked) {                                                                          \
    return semi24_rows_impl<Mi, T>(p, w, xp, r0, r1, yt, checked);                                         \
  }

// csr_segs of a float32 unit (spmm.h).
#define SPARSE_PRUNE_SEGS_ENTRY_POINT(Mi)                                                                   \
  void csr_segs(const Problem& p, const CsrSegments& w, const float* xp, int64_t rb0, int64_t rb1,        \
                float* yt) {                                                                               \
    csr_segs_impl<Mi>(p, w, xp, rb0, rb1, yt);                                                             \
  }
