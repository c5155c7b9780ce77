// sparse_prune::attention on the CPU: checks, the output layout, threads, and the x86 ISA unit's
// kernel (attention.h) for float32 on AVX-512 or AVX2+FMA; other dtypes and CPUs (the
// "portable" ISA) go through ATen's SDPA, copied into the same layout.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <cmath>
#include <limits>
#include <string>

#include "attention.h"
#include "cpu_ops.h"

namespace sparse_prune {
namespace cpu {
namespace {

constexpr int64_t kRowsPerTile = 6;  // the ISA units' register tile height (attention_kernel.h)

void check_operand(const at::Tensor& t, const char* name) {
  TORCH_CHECK_VALUE(t.dim() == 4, "attention: ", name, " must be 4-D [batch, heads, tokens, head_dim], got ",
                    t.dim(), "-D");
  TORCH_CHECK_VALUE(t.device().is_cpu(), "attention (CPU): ", name, " must be a CPU tensor, got ", t.device());
  const at::ScalarType st = t.scalar_type();
  TORCH_CHECK_TYPE(st == at::kFloat || st == at::kDouble || st == at::kHalf || st == at::kBFloat16, "attention: ",
                   name, " must be float32, float64, float16 or bfloat16, got ", st);
}

AttentionOperand operand(const at::Tensor& t) {
  return {t.data_ptr<float>(), t.stride(0), t.stride(1), t.stride(2)};
}

}  // namespace

at::Tensor attention_cpu(const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in,
                         std::optional<double> scale) {
  check_operand(q_in, "q");
  check_operand(k_in, "k");
  check_operand(v_in, "v");
  TORCH_CHECK_TYPE(k_in.scalar_type() == q_in.scalar_type() && v_in.scalar_type() == q_in.scalar_type(),
                   "attention: q, k and v must share one dtype, got ", q_in.scalar_type(), ", ",
                   k_in.scalar_type(), ", ", v_in.scalar_type());
  const int64_t B = q_in.size(0), H = q_in.size(1), Lq = q_in.size(2), D = q_in.size(3);
  const int64_t Lk = k_in.size(2), Dv = v_in.size(3);
  TORCH_CHECK_VALUE(k_in.size(0) == B && v_in.size(0) == B && k_in.size(1) == H && v_in.size(1) == H,
                    "attention: q, k and v must share batch and heads, got q ", q_in.sizes(), ", k ", k_in.sizes(),
                    ", v ", v_in.sizes());
  TORCH_CHECK_VALUE(k_in.size(3) == D, "attention: k's head_dim must be q's (", D, "), got ", k_in.size(3));
  TORCH_CHECK_VALUE(v_in.size(2) == Lk, "attention: v must have k's tokens (", Lk, "), got ", v_in.size(2));
  const double sc = scale.has_value() ? *scale : (D > 0 ? 1.0 / std::sqrt(static_cast<double>(D)) : 1.0);
  TORCH_CHECK_VALUE(std::isfinite(sc) && std::fabs(sc) <= std::numeric_limits<float>::max(),
                    "attention: scale must be finite in float32, got ", sc);
  // [B, Lq, H, Dv] in memory, returned as [B, H, Lq, Dv]: the layout the heads are merged from
  // next (x.transpose(1, 2).reshape(B, Lq, H·Dv) is then a view)
  at::Tensor out = at::empty({B, Lq, H, Dv}, q_in.options()).transpose(1, 2);
  if (out.numel() == 0) return out;
  if (Lk == 0) return out.zero_();  // as torch's SDPA: softmax over no keys weighs nothing
  const std::string isa = current_float_isa();
  if (q_in.scalar_type() != at::kFloat || isa == "portable") {
    out.copy_(at::scaled_dot_product_attention(q_in, k_in, v_in, {}, 0.0, false, sc));
    return out;
  }
  const auto last_contiguous = [](const at::Tensor& t) { return t.stride(3) == 1 ? t : t.contiguous(); };
  const at::Tensor q = last_contiguous(q_in), k = last_contiguous(k_in), v = last_contiguous(v_in);

  AttentionProblem p;
  p.B = B, p.H = H, p.Lq = Lq, p.Lk = Lk, p.D = D, p.Dv = Dv;
  p.scale = static_cast<float>(sc);
  p.q = operand(q), p.k = operand(k), p.v = operand(v);
  p.out = out.data_ptr<float>(), p.ob = out.stride(0), p.oh = out.stride(1), p.ol = out.stride(2);
  const int64_t workers = at::get_num_threads();
  // more than one query chunk per head only when the heads alone leave workers idle (each chunk
  // packs K and V again: Lk·(D + Dv) copies against chunk·Lk·(D + Dv) FMAs)
  const int64_t tiles = (Lq + kRowsPerTile - 1) / kRowsPerTile;
  const int64_t want = (2 * workers + B * H - 1) / (B * H);
  p.chunks = std::max<int64_t>(1, std::min<int64_t>(want, tiles));
  p.chunk_rows = (tiles + p.chunks - 1) / p.chunks * kRowsPerTile;
  p.chunks = (Lq + p.chunk_rows - 1) / p.chunk_rows;

  const auto scratch_of = isa == "avx512" ? avx512_f32::attention_scratch : avx2_f32::attention_scratch;
  const auto run = isa == "avx512" ? avx512_f32::attention_tasks : avx2_f32::attention_tasks;
  const int64_t per = scratch_of(p);
  const int64_t tasks = B * H * p.chunks;
  const int64_t slots = std::min(workers, tasks);
  at::Tensor scratch = at::empty({slots, per}, q.options());
  float* sd = scratch.data_ptr<float>();
  if (slots == 1) {
    run(p, 0, tasks, sd);
  } else {
    at::parallel_for(0, tasks, 1, [&](int64_t t0, int64_t t1) {
      const int64_t slot = at::get_thread_num();
      TORCH_CHECK(slot < slots, "attention (CPU): worker ", slot, " of ", slots);
      run(p, t0, t1, sd + slot * per);
    });
  }
  return out;
}

}  // namespace cpu
}  // namespace sparse_prune
