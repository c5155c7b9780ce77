// Torch-side declarations shared by the torch-facing units (cpu_ops.cpp, attention_ops.cpp).
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <string>

namespace sparse_prune {
namespace cpu {

// "avx512", "avx2" or "portable": what float32 runs on now (SPARSE_PRUNE_CPU_ISA, cpu_ops.cpp).
std::string current_float_isa();

// sparse_prune::attention on the CPU (attention_ops.cpp).
at::Tensor attention_cpu(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, std::optional<double> scale);

}  // namespace cpu
}  // namespace sparse_prune
