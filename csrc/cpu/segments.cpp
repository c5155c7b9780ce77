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

// Checks every row (columns strictly increasing within [0, K)) and lays the weight out.
template <typename I>
int build(const I* col, const int64_t* crow, const float* vals, int64_t N, int64_t K, int64_t span,
          SegmentLayout& L) {
  for (int64_t r = 0; r < N; ++r) {
    for (int64_t q = crow[r]; q < crow[r + 1]; ++q) {
      const int64_t c = static_cast<int64_t>(col[q]);
      if (c < 0 || c >= K) return kColOutOfRange;
      if (q > crow[r] && c <= static_cast<int64_t>(col[q - 1])) return kColUnsorted;
    }
  }
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
  std::vector<int64_t> bounds;  // row r0 + i's first weight in sub-block s at bounds[i * (nsb + 1) + s]
  std::vector<int64_t> order;
  for (int64_t rb = 0; rb < nrb; ++rb) {
    const int64_t r0 = rb * R, r1 = std::min(N, r0 + R);
    L.cum[rb] = crow[r0];
    bounds.assign((r1 - r0) * (nsb + 1), 0);
    for (int64_t r = r0; r < r1; ++r) {
      int64_t* b = bounds.data() + (r - r0) * (nsb + 1);
      int64_t q = crow[r];
      for (int64_t s = 0; s < nsb; ++s) {
        b[s] = q;
        while (q < crow[r + 1] && static_cast<int64_t>(col[q]) < (s + 1) * span) ++q;
      }
      b[nsb] = crow[r + 1];
    }
    for (int64_t s = 0; s < nsb; ++s) {
      block_seg.push_back(static_cast<int64_t>(seg_row.size()));
      block_val.push_back(static_cast<int64_t>(values.size()));
      order.clear();
      for (int64_t i = 0; i < r1 - r0; ++i) {
        const int64_t* b = bounds.data() + i * (nsb + 1);
        if (s == 0 || b[s + 1] > b[s]) order.push_back(i);
      }
      const auto len = [&](int64_t i) { return bounds[i * (nsb + 1) + s + 1] - bounds[i * (nsb + 1) + s]; };
      std::stable_sort(order.begin(), order.end(), [&](int64_t a, int64_t b) { return len(a) < len(b); });
      for (int64_t i : order) {
        const int64_t* b = bounds.data() + i * (nsb + 1);
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
  return kOk;
}

}  // namespace

int64_t segment_span(double density, int64_t max_tile) {
  const int64_t span = density < 0.075 ? 128 : density < 0.15 ? 96 : 64;
  // narrower tiles (AVX2, portable: 48 floats) leave room in L1 for proportionally more columns
  const int64_t scaled = span * std::max<int64_t>(1, 128 / std::max<int64_t>(1, max_tile));
  return std::min<int64_t>(256, scaled) / 16 * 16;
}

std::shared_ptr<const SegmentLayout> csr_segments(const at::Tensor& values_src, const at::Tensor& crow_src,
                                                  const at::Tensor& col_src, const at::Tensor& values,
                                                  const int64_t* crow, int64_t N, int64_t K, int64_t span,
                                                  int* status) {
  *status = kOk;
  if (!segments_enabled()) return nullptr;
  if (values_src.is_inference() || crow_src.is_inference() || col_src.is_inference()) return nullptr;
  constexpr int64_t kMax = std::numeric_limits<int32_t>::max();
  if (N >= kMax || K >= kMax || values.numel() >= kMax || span <= 0 || span > 256) return nullptr;
  std::lock_guard<std::mutex> lock(cache_mutex);
  for (const Entry& e : cache) {
    if (e.N == N && e.K == K && e.span == span && e.values.unchanged(values_src) && e.crow.unchanged(crow_src) &&
        e.col.unchanged(col_src))
      return e.layout;
  }
  auto layout = std::make_shared<SegmentLayout>();
  const float* vals = values.data_ptr<float>();
  int st = kOk;
  switch (col_src.scalar_type()) {
    case at::kShort: st = build(col_src.contiguous().data_ptr<int16_t>(), crow, vals, N, K, span, *layout); break;
    case at::kLong: st = build(col_src.contiguous().data_ptr<int64_t>(), crow, vals, N, K, span, *layout); break;
    default: st = build(col_src.contiguous().data_ptr<int32_t>(), crow, vals, N, K, span, *layout); break;
  }
  if (st != kOk) {
    *status = st;
    return nullptr;
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
