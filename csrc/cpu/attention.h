// Attention out = softmax(scale · Q·Kᵀ) · V per (batch, head), float32: the plain-pointer
// interface between the torch-facing unit (attention_ops.cpp: checks, threads, layout) and the
// x86 ISA units, which instantiate attention_kernel.h. There is no portable unit: on other CPUs
// torch's SDPA serves (vectorized by at::vec for every CPU; the kernel's loops compiled for plain
// SSE2 ran 14x slower than it, 23.9 ms against 1.75 ms on ViT-B/16's attention, Zen 4).
// Like spmm.h, it includes no torch or C++ library header (see there why).
#pragma once

#include <cstdint>

namespace sparse_prune {
namespace cpu {

// Element strides of a [B, H, L, D] operand whose last dimension is contiguous.
struct AttentionOperand {
  const float* data = nullptr;
  int64_t sb = 0, sh = 0, sl = 0;
};

struct AttentionProblem {
  int64_t B = 0, H = 0, Lq = 0, Lk = 0, D = 0, Dv = 0;  // Lk >= 1 (the caller handles Lk = 0)
  float scale = 1.0f;                                     // finite
  AttentionOperand q, k, v;                              // [B, H, Lq, D], [B, H, Lk, D], [B, H, Lk, Dv]
  float* out = nullptr;                                  // [B, H, Lq, Dv] at these strides
  int64_t ob = 0, oh = 0, ol = 0;
  // Query rows of a (batch, head) are cut into `chunks` runs of `chunk_rows`: task t is
  // (b, h, c) = (t / (H·chunks), t / chunks % H, t % chunks). More than one chunk only when
  // B·H alone cannot keep the workers busy (each chunk packs K and V again).
  int64_t chunks = 1, chunk_rows = 0;
};

// Per ISA unit: the floats of scratch one worker needs, and tasks [t0, t1) with that scratch.
#define SPARSE_PRUNE_CPU_ATTENTION_API(ns)                                                    \
  namespace ns {                                                                              \
  int64_t attention_scratch(const AttentionProblem& p);                                       \
  void attention_tasks(const AttentionProblem& p, int64_t t0, int64_t t1, float* scratch);    \
  }
SPARSE_PRUNE_CPU_ATTENTION_API(avx2_f32)
SPARSE_PRUNE_CPU_ATTENTION_API(avx512_f32)
#undef SPARSE_PRUNE_CPU_ATTENTION_API

#define SPARSE_PRUNE_ABSENT_ATTENTION_ENTRY_POINTS                                      \
  int64_t attention_scratch(const AttentionProblem&) { return 0; }                      \
  void attention_tasks(const AttentionProblem&, int64_t, int64_t, float*) {}

}  // namespace cpu
}  // namespace sparse_prune
