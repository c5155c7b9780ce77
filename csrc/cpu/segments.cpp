// The segment layout of a csr weight and its cache (segments.h).
#include "segments.h"

#include <c10/util/intrusive_ptr.h>

#include <algorithm>
#include <array>
#include <cstdint>
#include <tuple>
#include <utility>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <mutex>
#include <string>

namespace sparse_prune {
namespace cpu {
namespace {

bool segments_enabled() {
  const char* env = std::getenv("SPARSE_PRUNE_CPU_SEGMENTS");
  if (!env || !*env) return true;
  const std::string v(env);
  TORCH_CHECK_VALUE(v == "0" || v == "1", "SPARSE_PRUNE_CPU_SEGMENTS must be 0 or 1, got '", v, "'");
  return v == "1";
}

// One of the op's input tensors as the cache saw it: the tensor itself (weakly: the cache never
// keeps a weight alive), where its data was and its version counter then.
struct Seen {
  c10::weak_intrusive_ptr<c10::TensorImpl, c10::UndefinedTensorImpl> impl;
  const void* data;
  int64_t version;
  explicit Seen(const at::Tensor& t) : impl(t.getIntrusivePtr()), data(t.data_ptr()), version(t._version()) {}
  bool alive() const { return !impl.expired(); }
  bool is(const at::Tensor& t) const { return alive() && impl._unsafe_get_target() == t.unsafeGetTensorImpl(); }
  bool unchanged(const at::Tensor& t) const { return is(t) && data == t.data_ptr() && version == t._version(); }
};

// A cached layout: the format it was built from (kCsrKey, kBsrKey: values, crow, col; kSemiKey:
// values, meta), those tensors as seen then, the shape and the sub-block width.
enum Source { kCsrKey, kSemiKey, kBsrKey };
struct Entry {
  Source source;
  std::vector<Seen> seen;
  int64_t N, K, span, rows;
  std::shared_ptr<const SegmentLayout> layout;
  bool alive() const {
    return std::all_of(seen.begin(), seen.end(), [](const Seen& s) { return s.alive(); });
  }
  bool unchanged(const std::vector<const at::Tensor*>& ts) const {
    for (size_t i = 0; i < ts.size(); ++i)
      if (!seen[i].unchanged(*ts[i])) return false;
    return true;
  }
};

std::mutex cache_mutex;
std::vector<Entry> cache;  // a few entries per model: linear search
constexpr size_t kMaxEntries = 4096;

template <typename T>
at::Tensor to_tensor(const std::vector<T>& v, at::ScalarType dtype) {
  at::Tensor t = at::empty({static_cast<int64_t>(v.size())}, at::TensorOptions().dtype(dtype));
  if (!v.empty()) std::memcpy(t.data_ptr(), v.data(), v.size() * sizeof(T));
  return t;
}

// Blocks at least this dense pair rows by the columns they share (pair_by_shared); sparser ones
// by length (pair_by_length). Measured in a standalone loop (Zen 3, 40-token tiles, 256-row
// blocks, random masks, ymm FMAs/ns against the length pairing): 4.06 against 3.17 at 2:4, 3.68
// against 3.12 at 50%, 3.15 against 2.96 at 30%, but 2.49 against 2.62 at 10% (a quarter of the
// weights shared, three loops per pair).
constexpr double kShareDensity = 0.2;

// One row's stored weights in a sub-block: columns (within it) and values.
struct RowPart {
  int32_t row;
  std::vector<uint8_t> col;
  std::vector<float> val;
};

// Appends the segment of rows a (row0) and b (row1, no more weights than a) to values and cols:
// the columns both keep, then side by side as many of each one's others as b has, then the rest
// of a's. Returns its head.
SegmentHead emit_pair(const RowPart& a, const RowPart& b, std::vector<float>& values, std::vector<uint8_t>& cols) {
  TORCH_INTERNAL_ASSERT(b.col.size() <= a.col.size(), "emit_pair: row1 holds more weights than row0");
  std::vector<size_t> only_a, only_b;
  size_t x = 0, y = 0;
  int32_t shared = 0;
  while (x < a.col.size() || y < b.col.size()) {
    if (y == b.col.size() || (x < a.col.size() && a.col[x] < b.col[y])) {
      only_a.push_back(x++);
    } else if (x == a.col.size() || b.col[y] < a.col[x]) {
      only_b.push_back(y++);
    } else {
      values.push_back(a.val[x]);
      values.push_back(b.val[y]);
      cols.push_back(a.col[x]);
      ++shared, ++x, ++y;
    }
  }
  const size_t e = only_b.size();
  for (size_t k = 0; k < e; ++k) values.push_back(a.val[only_a[k]]), cols.push_back(a.col[only_a[k]]);
  for (size_t k = 0; k < e; ++k) values.push_back(b.val[only_b[k]]), cols.push_back(b.col[only_b[k]]);
  for (size_t k = e; k < only_a.size(); ++k) values.push_back(a.val[only_a[k]]), cols.push_back(a.col[only_a[k]]);
  return SegmentHead{a.row, b.row, shared, static_cast<int32_t>(e), static_cast<int32_t>(only_a.size() - e)};
}

// Appends row a's weights alone (row1 = -1) to values and cols; returns its head.
SegmentHead emit_lone(const RowPart& a, std::vector<float>& values, std::vector<uint8_t>& cols) {
  values.insert(values.end(), a.val.begin(), a.val.end());
  cols.insert(cols.end(), a.col.begin(), a.col.end());
  return SegmentHead{a.row, -1, 0, 0, static_cast<int32_t>(a.col.size())};
}

// Pairs rows greedily: each row in turn with the unpaired one, among the next kPairWindow, that
// maximizes 4 * (columns both keep) - |difference in weights| (the unpaired weights run alone,
// on one chain). The window keeps the build linear in the rows per block (a 256-row block, the
// default, sees every candidate).
constexpr int64_t kPairWindow = 255;
std::vector<std::pair<int64_t, int64_t>> pair_by_shared(const std::vector<RowPart>& rows) {
  const size_t n = rows.size();
  std::vector<std::array<uint64_t, 4>> bits(n);
  for (size_t i = 0; i < n; ++i) {
    bits[i] = {0, 0, 0, 0};
    for (uint8_t c : rows[i].col) bits[i][c >> 6] |= uint64_t{1} << (c & 63);
  }
  std::vector<char> used(n, 0);
  std::vector<std::pair<int64_t, int64_t>> pairs;
  for (size_t i = 0; i < n; ++i) {
    if (used[i]) continue;
    used[i] = 1;
    int64_t best = -1, best_score = std::numeric_limits<int64_t>::min();
    const int64_t li = static_cast<int64_t>(rows[i].col.size());
    int64_t seen = 0;
    for (size_t j = i + 1; j < n && seen < kPairWindow; ++j) {
      if (used[j]) continue;
      ++seen;
      int64_t common = 0;
      for (int w = 0; w < 4; ++w) common += __builtin_popcountll(bits[i][w] & bits[j][w]);
      const int64_t score = 4 * common - std::abs(li - static_cast<int64_t>(rows[j].col.size()));
      if (score > best_score) best_score = score, best = static_cast<int64_t>(j);
    }
    if (best >= 0) used[best] = 1;
    pairs.emplace_back(static_cast<int64_t>(i), best);
  }
  return pairs;
}

// Pairs rows in order of their weights (the shortest alone when their count is odd).
std::vector<std::pair<int64_t, int64_t>> pair_by_length(const std::vector<RowPart>& rows) {
  std::vector<int64_t> order(rows.size());
  for (size_t i = 0; i < rows.size(); ++i) order[i] = static_cast<int64_t>(i);
  std::stable_sort(order.begin(), order.end(),
                   [&](int64_t a, int64_t b) { return rows[a].col.size() < rows[b].col.size(); });
  std::vector<std::pair<int64_t, int64_t>> pairs;
  size_t k = 0;
  if (order.size() % 2) pairs.emplace_back(order[k++], -1);
  for (; k + 1 < order.size(); k += 2) pairs.emplace_back(order[k], order[k + 1]);
  return pairs;
}

// Lays the weight out from its checked rows: bounds[r * (nsb + 1) + s] is row r's first stored
// weight in sub-block s (the index pass's K-block bounds, span-wide blocks). Each (row block,
// sub-block) pairs its rows (pair_by_shared or pair_by_length, by its density) and stores its
// segments sorted by (shared, paired, tail), lone rows last, so that the kernel's loops end
// where the branch predictor expects them (unsorted, a standalone loop ran at 2.2 against 3.0
// FMAs/ns).
template <typename I>
void build(const I* col, const int64_t* crow, const float* vals, const int64_t* bounds, int64_t N, int64_t K,
           int64_t span, int64_t R, SegmentLayout& L) {
  const int64_t nrb = (N + R - 1) / R, nsb = K > 0 ? (K + span - 1) / span : 0;
  const int64_t nnz = crow[N];
  std::vector<int64_t> block_seg, block_val, block_col;
  std::vector<SegmentHead> segs;
  std::vector<uint8_t> cols;  // within the sub-block: span <= 256
  std::vector<float> values;
  block_seg.reserve(nrb * nsb + 1);
  block_val.reserve(nrb * nsb + 1);
  block_col.reserve(nrb * nsb + 1);
  values.reserve(nnz);
  cols.reserve(nnz);
  L.cum.assign(nrb + 1, nnz);
  std::vector<RowPart> rows;
  for (int64_t rb = 0; rb < nrb; ++rb) {
    const int64_t r0 = rb * R, r1 = std::min(N, r0 + R);
    L.cum[rb] = crow[r0];
    for (int64_t s = 0; s < nsb; ++s) {
      block_seg.push_back(static_cast<int64_t>(segs.size()));
      block_val.push_back(static_cast<int64_t>(values.size()));
      block_col.push_back(static_cast<int64_t>(cols.size()));
      rows.clear();
      int64_t stored = 0;
      for (int64_t i = 0; i < r1 - r0; ++i) {
        const int64_t* b = bounds + (r0 + i) * (nsb + 1);
        if (s != 0 && b[s + 1] == b[s]) continue;
        RowPart part{static_cast<int32_t>(r0 + i), {}, {}};
        for (int64_t q = b[s]; q < b[s + 1]; ++q) {
          part.col.push_back(static_cast<uint8_t>(static_cast<int64_t>(col[q]) - s * span));
          part.val.push_back(vals[q]);
        }
        stored += b[s + 1] - b[s];
        rows.push_back(std::move(part));
      }
      const int64_t width = std::min(span, K - s * span);
      const bool by_shared = static_cast<double>(stored) >= kShareDensity * static_cast<double>((r1 - r0) * width);
      const auto pairs = by_shared ? pair_by_shared(rows) : pair_by_length(rows);
      // each segment's arrays built apart, then appended in sorted order
      std::vector<SegmentHead> heads;
      std::vector<std::vector<float>> seg_vals;
      std::vector<std::vector<uint8_t>> seg_cols;
      for (const auto& [i, j] : pairs) {
        std::vector<float> v;
        std::vector<uint8_t> c;
        if (j < 0)
          heads.push_back(emit_lone(rows[i], v, c));
        else if (rows[j].col.size() > rows[i].col.size())
          heads.push_back(emit_pair(rows[j], rows[i], v, c));
        else
          heads.push_back(emit_pair(rows[i], rows[j], v, c));
        seg_vals.push_back(std::move(v));
        seg_cols.push_back(std::move(c));
      }
      std::vector<int64_t> order(heads.size());
      for (size_t k = 0; k < order.size(); ++k) order[k] = static_cast<int64_t>(k);
      const auto key = [&](int64_t k) {
        const SegmentHead& h = heads[k];
        return std::make_tuple(h.row1 < 0, h.shared, h.paired, h.tail);
      };
      std::stable_sort(order.begin(), order.end(), [&](int64_t a, int64_t b) { return key(a) < key(b); });
      for (int64_t k : order) {
        segs.push_back(heads[k]);
        values.insert(values.end(), seg_vals[k].begin(), seg_vals[k].end());
        cols.insert(cols.end(), seg_cols[k].begin(), seg_cols[k].end());
      }
    }
  }
  block_seg.push_back(static_cast<int64_t>(segs.size()));
  block_val.push_back(static_cast<int64_t>(values.size()));
  block_col.push_back(static_cast<int64_t>(cols.size()));
  L.block_seg = to_tensor(block_seg, at::kLong);
  L.block_val = to_tensor(block_val, at::kLong);
  L.block_col = to_tensor(block_col, at::kLong);
  static_assert(sizeof(SegmentHead) == 5 * sizeof(int32_t), "SegmentHead is five int32");
  std::vector<int32_t> heads(segs.size() * 5);
  if (!segs.empty()) std::memcpy(heads.data(), segs.data(), heads.size() * sizeof(int32_t));
  L.seg = to_tensor(heads, at::kInt);
  L.values = to_tensor(values, at::kFloat);
  L.col = to_tensor(cols, at::kByte);
  CsrSegments& v = L.view;
  v.rows_per_block = R;
  v.span = span;
  v.nrb = nrb;
  v.nsb = nsb;
  v.block_seg = L.block_seg.data_ptr<int64_t>();
  v.block_val = L.block_val.data_ptr<int64_t>();
  v.block_col = L.block_col.data_ptr<int64_t>();
  v.seg = reinterpret_cast<const SegmentHead*>(L.seg.data_ptr<int32_t>());
  v.values = L.values.data_ptr<float>();
  v.col = L.col.data_ptr<uint8_t>();
}

bool any_inference(const std::vector<const at::Tensor*>& ts) {
  return std::any_of(ts.begin(), ts.end(), [](const at::Tensor* t) { return t->is_inference(); });
}

// The cached layout of these tensors, or null (cache_mutex held).
std::shared_ptr<const SegmentLayout> lookup(Source source, const std::vector<const at::Tensor*>& ts, int64_t N,
                                            int64_t K, int64_t span, int64_t rows) {
  for (const Entry& e : cache)
    if (e.source == source && e.N == N && e.K == K && e.span == span && e.rows == rows && e.unchanged(ts))
      return e.layout;
  return nullptr;
}

// Caches a new layout (cache_mutex held), first dropping the entries of freed tensors and the
// stale ones of these (changed in place, or moved).
void remember(Source source, const std::vector<const at::Tensor*>& ts, int64_t N, int64_t K, int64_t span,
              int64_t rows, std::shared_ptr<const SegmentLayout> layout) {
  cache.erase(std::remove_if(cache.begin(), cache.end(),
                             [&](const Entry& e) {
                               return !e.alive() || (e.source == source && e.seen[0].is(*ts[0]) && e.N == N &&
                                                     e.K == K && e.span == span && e.rows == rows);
                             }),
              cache.end());
  if (cache.size() >= kMaxEntries) cache.erase(cache.begin());
  std::vector<Seen> seen;
  for (const at::Tensor* t : ts) seen.emplace_back(*t);
  cache.push_back(Entry{source, std::move(seen), N, K, span, rows, std::move(layout)});
}

// The sub-block bounds of a csr weight from the ISA's index pass (span-wide
// K-blocks), into bounds; returns its status.
int sub_block_bounds(const CsrWeight& w, int64_t N, int64_t K, int64_t span, CsrIndexFn index,
                     std::vector<int64_t>& bounds) {
  Problem p;
  p.N = N;
  p.K = p.kp = K;
  p.kblock = span;
  bounds.assign(std::max<int64_t>(1, N * bounds_stride(p)), 0);
  return index(p, w, 0, N, bounds.data());
}

std::shared_ptr<SegmentLayout> build_layout(const CsrWeight& w, const int64_t* bounds, int64_t N, int64_t K,
                                            int64_t span, int64_t rows) {
  auto layout = std::make_shared<SegmentLayout>();
  const float* vals = static_cast<const float*>(w.values);
  switch (w.index_bytes) {
    case 2: build(static_cast<const int16_t*>(w.col), w.crow, vals, bounds, N, K, span, rows, *layout); break;
    case 8: build(static_cast<const int64_t*>(w.col), w.crow, vals, bounds, N, K, span, rows, *layout); break;
    default: build(static_cast<const int32_t*>(w.col), w.crow, vals, bounds, N, K, span, rows, *layout); break;
  }
  return layout;
}

bool fits(int64_t N, int64_t K, int64_t nnz, int64_t span, int64_t rows) {
  constexpr int64_t kMax = std::numeric_limits<int32_t>::max();
  return N < kMax && K < kMax && nnz < kMax && span > 0 && span <= 256 && rows > 0;
}

}  // namespace

int64_t segment_rows(int64_t N) {
  const int64_t blocks = (N + kSegmentRows - 1) / kSegmentRows;
  if (blocks <= 1 || blocks % 2 == 0) return kSegmentRows;
  // ceil(N / count) rows can give fewer than count blocks (N = 65025, count 256: 255 of 255)
  for (int64_t count = blocks + 1;; count += 2) {
    const int64_t rows = (N + count - 1) / count;
    if (((N + rows - 1) / rows) % 2 == 0) return rows;
    if (rows == 1) return 1;  // N odd rows of 1: no even count left
  }
}

int64_t segment_span(double density, int64_t max_tile) {
  const int64_t span = density < 0.075 ? 128 : density < 0.15 ? 96 : 64;
  // narrower tiles (AVX2, portable: 48 floats) leave room in L1 for proportionally more columns
  const int64_t scaled = span * std::max<int64_t>(1, 128 / std::max<int64_t>(1, max_tile));
  return std::min<int64_t>(256, scaled) / 16 * 16;
}

std::shared_ptr<const SegmentLayout> csr_segments(const at::Tensor& values_src, const at::Tensor& crow_src,
                                                  const at::Tensor& col_src, const CsrWeight& w, int64_t N,
                                                  int64_t K, int64_t span, int64_t rows, CsrIndexFn index,
                                                  int* status) {
  *status = kOk;
  if (!segments_enabled()) return nullptr;
  const std::vector<const at::Tensor*> ts{&values_src, &crow_src, &col_src};
  if (any_inference(ts) || !fits(N, K, w.crow[N], span, rows)) return nullptr;
  std::lock_guard<std::mutex> lock(cache_mutex);
  if (auto hit = lookup(kCsrKey, ts, N, K, span, rows)) return hit;
  std::vector<int64_t> bounds;
  *status = sub_block_bounds(w, N, K, span, index, bounds);
  if (*status != kOk) return nullptr;
  auto layout = build_layout(w, bounds.data(), N, K, span, rows);
  remember(kCsrKey, ts, N, K, span, rows, layout);
  return layout;
}

std::shared_ptr<const SegmentLayout> semi24_segments(const at::Tensor& values_src, const at::Tensor& meta_src,
                                                     const Semi24Weight& w, int64_t N, int64_t K, int64_t span,
                                                     int64_t rows, Semi24CheckFn check, CsrIndexFn index,
                                                     int* status) {
  *status = kOk;
  if (!segments_enabled()) return nullptr;
  const std::vector<const at::Tensor*> ts{&values_src, &meta_src};
  if (any_inference(ts) || !fits(N, K, N * (K / 2), span, rows) || K % 4 != 0) return nullptr;
  std::lock_guard<std::mutex> lock(cache_mutex);
  if (auto hit = lookup(kSemiKey, ts, N, K, span, rows)) return hit;
  Problem p;
  p.N = N;
  p.K = p.kp = K;
  *status = check(p, w, 0, N);
  if (*status != kOk) return nullptr;
  // the csr arrays of the pattern: group g of a row keeps columns 4g + (nibble & 3) and
  // 4g + (nibble >> 2), its two stored values in that order (docs/semi_structured_layout.md; the
  // ISA units' semi24_columns, which lives in their own header: spmm.h says why)
  const int64_t half = K / 2, groups = K / 4;
  std::vector<int64_t> crow(N + 1);
  std::vector<int32_t> col(std::max<int64_t>(1, N * half));
  for (int64_t r = 0; r <= N; ++r) crow[r] = r * half;
  for (int64_t r = 0; r < N; ++r) {
    const int16_t* m = w.meta + r * w.meta_cols;
    int32_t* c = col.data() + r * half;
    for (int64_t g = 0; g < groups; ++g) {
      const unsigned nib = (static_cast<uint16_t>(m[g >> 2]) >> ((g & 3) * 4)) & 0xFu;
      c[2 * g] = static_cast<int32_t>(4 * g + (nib & 3u));
      c[2 * g + 1] = static_cast<int32_t>(4 * g + (nib >> 2));
    }
  }
  const CsrWeight cw{w.values, crow.data(), col.data(), 4};
  std::vector<int64_t> bounds;
  *status = sub_block_bounds(cw, N, K, span, index, bounds);
  if (*status != kOk) return nullptr;  // cannot happen after check: kept as a guard
  auto layout = build_layout(cw, bounds.data(), N, K, span, rows);
  remember(kSemiKey, ts, N, K, span, rows, layout);
  return layout;
}

std::shared_ptr<const SegmentLayout> bsr_segments(const at::Tensor& values_src, const at::Tensor& crow_src,
                                                  const at::Tensor& col_src, const BsrWeight& w, int64_t N,
                                                  int64_t K, int64_t span, int64_t rows, BsrIndexFn check,
                                                  CsrIndexFn index, int* status) {
  *status = kOk;
  if (!segments_enabled()) return nullptr;
  const std::vector<const at::Tensor*> ts{&values_src, &crow_src, &col_src};
  const int64_t bm = w.bm, bk = w.bk, nbr = (N + bm - 1) / bm;
  if (bm <= 0 || bk <= 0 || any_inference(ts)) return nullptr;
  const int64_t nb = nbr > 0 ? w.crow[nbr] : 0;
  if (nb > std::numeric_limits<int32_t>::max() / (bm * bk) || !fits(N, K, nb * bm * bk, span, rows)) return nullptr;
  std::lock_guard<std::mutex> lock(cache_mutex);
  if (auto hit = lookup(kBsrKey, ts, N, K, span, rows)) return hit;
  // the block columns (range, order) and the padding past K, as the bsr kernels check them
  Problem p;
  p.N = N;
  p.K = K;
  p.kp = p.kblock = (K + bk - 1) / bk * bk;
  std::vector<int64_t> kb(std::max<int64_t>(1, nbr * bounds_stride(p)), 0);
  *status = check(p, w, 0, nbr, kb.data());
  if (*status != kOk) return nullptr;
  // the csr arrays: row br·bm + i keeps columns c·bk + j < K of each of its block row's blocks c,
  // with values[block][i][j]; the rows past N (the last block row's padding) are dropped
  const float* vals = static_cast<const float*>(w.values);
  const auto block_col = [&](int64_t q) -> int64_t {
    switch (w.index_bytes) {
      case 2: return static_cast<const int16_t*>(w.col)[q];
      case 8: return static_cast<const int64_t*>(w.col)[q];
      default: return static_cast<const int32_t*>(w.col)[q];
    }
  };
  std::vector<int64_t> crow(N + 1, 0);
  std::vector<int32_t> col;
  std::vector<float> value;
  col.reserve(static_cast<size_t>(nb * bm * bk));
  value.reserve(static_cast<size_t>(nb * bm * bk));
  for (int64_t r = 0; r < N; ++r) {
    const int64_t br = r / bm, i = r % bm;
    for (int64_t q = w.crow[br]; q < w.crow[br + 1]; ++q) {
      const int64_t c0 = block_col(q) * bk;
      for (int64_t j = 0; j < bk && c0 + j < K; ++j) {
        col.push_back(static_cast<int32_t>(c0 + j));
        value.push_back(vals[(q * bm + i) * bk + j]);
      }
    }
    crow[r + 1] = static_cast<int64_t>(col.size());
  }
  if (col.empty()) {
    col.push_back(0);
    value.push_back(0.0f);
  }
  const CsrWeight cw{value.data(), crow.data(), col.data(), 4};
  std::vector<int64_t> bounds;
  *status = sub_block_bounds(cw, N, K, span, index, bounds);
  if (*status != kOk) return nullptr;  // cannot happen after check: kept as a guard
  auto layout = build_layout(cw, bounds.data(), N, K, span, rows);
  remember(kBsrKey, ts, N, K, span, rows, layout);
  return layout;
}

void clear_segment_cache() {
  std::lock_guard<std::mutex> lock(cache_mutex);
  cache.clear();
}

int64_t segment_cache_size() {
  std::lock_guard<std::mutex> lock(cache_mutex);
  return static_cast<int64_t>(cache.size());
}

}  // namespace cpu
}  // namespace sparse_prune
