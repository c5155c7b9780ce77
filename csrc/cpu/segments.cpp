// The segment layout of a csr weight and its cache (segments.h).
#include "segments.h"

#include <c10/util/intrusive_ptr.h>

#include <algorithm>
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

struct Entry {
  Seen values, crow, col;
  int64_t N, K, span;
  std::shared_ptr<const SegmentLayout> layout;
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

// Lays the weight out from its checked rows: bounds[r * (nsb + 1) + s] is row r's first stored
// weight in sub-block s (the index pass's K-block bounds, span-wide blocks).
template <typename I>
void build(const I* col, const int64_t* crow, const float* vals, const int64_t* bounds, int64_t N, int64_t K,
           int64_t span, SegmentLayout& L) {
  const int64_t R = kSegmentRows;
  const int64_t nrb = (N + R - 1) / R, nsb = K > 0 ? (K + span - 1) / span : 0;
  const int64_t nnz = crow[N];
  std::vector<int64_t> block_seg, block_val;
  std::vector<int32_t> seg_row, seg_len;
  std::vector<uint8_t> cols;  // within the sub-block: span <= 256
  std::vector<float> values;
  block_seg.reserve(nrb * nsb + 1);
  block_val.reserve(nrb * nsb + 1);
  values.reserve(nnz);
  cols.reserve(nnz);
  L.cum.assign(nrb + 1, nnz);
  std::vector<int64_t> order;
  for (int64_t rb = 0; rb < nrb; ++rb) {
    const int64_t r0 = rb * R, r1 = std::min(N, r0 + R);
    L.cum[rb] = crow[r0];
    for (int64_t s = 0; s < nsb; ++s) {
      block_seg.push_back(static_cast<int64_t>(seg_row.size()));
      block_val.push_back(static_cast<int64_t>(values.size()));
      order.clear();
      for (int64_t i = 0; i < r1 - r0; ++i) {
        const int64_t* b = bounds + (r0 + i) * (nsb + 1);
        if (s == 0 || b[s + 1] > b[s]) order.push_back(i);
      }
      const auto len = [&](int64_t i) { return bounds[(r0 + i) * (nsb + 1) + s + 1] - bounds[(r0 + i) * (nsb + 1) + s]; };
      std::stable_sort(order.begin(), order.end(), [&](int64_t a, int64_t b) { return len(a) < len(b); });
      for (int64_t i : order) {
        const int64_t* b = bounds + (r0 + i) * (nsb + 1);
        seg_row.push_back(static_cast<int32_t>(r0 + i));
        seg_len.push_back(static_cast<int32_t>(b[s + 1] - b[s]));
        for (int64_t q = b[s]; q < b[s + 1]; ++q) {
          values.push_back(vals[q]);
          cols.push_back(static_cast<uint8_t>(static_cast<int64_t>(col[q]) - s * span));
        }
      }
    }
  }
  block_seg.push_back(static_cast<int64_t>(seg_row.size()));
  block_val.push_back(static_cast<int64_t>(values.size()));
  L.block_seg = to_tensor(block_seg, at::kLong);
  L.block_val = to_tensor(block_val, at::kLong);
  L.seg_row = to_tensor(seg_row, at::kInt);
  L.seg_len = to_tensor(seg_len, at::kInt);
  L.values = to_tensor(values, at::kFloat);
  L.col = to_tensor(cols, at::kByte);
  CsrSegments& v = L.view;
  v.rows_per_block = R;
  v.span = span;
  v.nrb = nrb;
  v.nsb = nsb;
  v.block_seg = L.block_seg.data_ptr<int64_t>();
  v.block_val = L.block_val.data_ptr<int64_t>();
  v.seg_row = L.seg_row.data_ptr<int32_t>();
  v.seg_len = L.seg_len.data_ptr<int32_t>();
  v.values = L.values.data_ptr<float>();
  v.col = L.col.data_ptr<uint8_t>();
}

}  // namespace

int64_t segment_span(double density, int64_t max_tile) {
  const int64_t span = density < 0.075 ? 128 : density < 0.15 ? 96 : 64;
  // narrower tiles (AVX2, portable: 48 floats) leave room in L1 for proportionally more columns
  const int64_t scaled = span * std::max<int64_t>(1, 128 / std::max<int64_t>(1, max_tile));
  return std::min<int64_t>(256, scaled) / 16 * 16;
}

std::shared_ptr<const SegmentLayout> csr_segments(const at::Tensor& values_src, const at::Tensor& crow_src,
                                                  const at::Tensor& col_src, const CsrWeight& w, int64_t N,
                                                  int64_t K, int64_t span, CsrIndexFn index, int* status) {
  *status = kOk;
  if (!segments_enabled()) return nullptr;
  if (values_src.is_inference() || crow_src.is_inference() || col_src.is_inference()) return nullptr;
  constexpr int64_t kMax = std::numeric_limits<int32_t>::max();
  if (N >= kMax || K >= kMax || w.crow[N] >= kMax || span <= 0 || span > 256) return nullptr;
  std::lock_guard<std::mutex> lock(cache_mutex);
  for (const Entry& e : cache) {
    if (e.N == N && e.K == K && e.span == span && e.values.unchanged(values_src) && e.crow.unchanged(crow_src) &&
        e.col.unchanged(col_src))
      return e.layout;
  }
  Problem p;  // the index pass with span-wide K-blocks: the sub-blocks' bounds
  p.N = N;
  p.K = p.kp = K;
  p.kblock = span;
  std::vector<int64_t> bounds(std::max<int64_t>(1, N * bounds_stride(p)));
  const int st = index(p, w, 0, N, bounds.data());
  if (st != kOk) {
    *status = st;
    return nullptr;
  }
  auto layout = std::make_shared<SegmentLayout>();
  const float* vals = static_cast<const float*>(w.values);
  switch (w.index_bytes) {
    case 2: build(static_cast<const int16_t*>(w.col), w.crow, vals, bounds.data(), N, K, span, *layout); break;
    case 8: build(static_cast<const int64_t*>(w.col), w.crow, vals, bounds.data(), N, K, span, *layout); break;
    default: build(static_cast<const int32_t*>(w.col), w.crow, vals, bounds.data(), N, K, span, *layout); break;
  }
  // drop the entries of freed tensors, and the stale ones of these (changed in place, or moved)
  cache.erase(std::remove_if(cache.begin(), cache.end(),
                             [&](const Entry& e) {
                               return !e.values.alive() || !e.crow.alive() || !e.col.alive() ||
                                      (e.values.is(values_src) && e.N == N && e.K == K && e.span == span);
                             }),
              cache.end());
  if (cache.size() >= kMaxEntries) cache.erase(cache.begin());
  cache.push_back(Entry{Seen(values_src), Seen(crow_src), Seen(col_src), N, K, span, layout});
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
