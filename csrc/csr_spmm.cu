// CSR SpMM: Yᵀ [N, M] = W [N, K] (CSR) · Xᵀ [K, M] (+ bias), i.e. Y = X · Wᵀ read transposed.
//
// One warp per (weight row, chunk of 32·VEC columns of Xᵀ). Rows are visited in the order
// given by `order` (longest first, computed by the caller) so long rows start early instead of
// stalling the grid's tail. For each stored weight the warp reads a contiguous run of Xᵀ: each
// lane loads VEC consecutive values in one 16-byte load (VEC = 8 for 16-bit types, 4 for
// fp32) when M % VEC == 0, else element by element. fp32 accumulation, fused bias; empty rows
// give the bias (or 0). No torch headers; register_ops.cpp checks inputs and launches.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

namespace sparse_prune {
namespace {

constexpr int kWarpsPerBlock = 4;

__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }
template <typename T>
__device__ __forceinline__ T from_float(float v);
template <>
__device__ __forceinline__ float from_float<float>(float v) { return v; }
template <>
__device__ __forceinline__ __half from_float<__half>(float v) { return __float2half_rn(v); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}

template <typename T>
struct Vec {
  static constexpr int kWidth = 16 / sizeof(T);
};

template <typename T, typename I, bool kVector>
__global__ void __launch_bounds__(32 * kWarpsPerBlock)
    csr_spmm_kernel(const T* __restrict__ xt, const T* __restrict__ values,
                    const int32_t* __restrict__ crow, const I* __restrict__ col,
                    const int32_t* __restrict__ order, const T* __restrict__ bias,
                    T* __restrict__ yt, int64_t M, int64_t N) {
  constexpr int V = Vec<T>::kWidth;
  const int lane = threadIdx.x & 31;
  const int64_t slot = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + (threadIdx.x >> 5);
  if (slot >= N) return;
  const int64_t row = order[slot];
  const int64_t m = (static_cast<int64_t>(blockIdx.y) * 32 + lane) * V;
  if (m >= M) return;
  float acc[V];
#pragma unroll
  for (int i = 0; i < V; ++i) acc[i] = 0.f;
  const int64_t start = crow[row];
  const int64_t end = crow[row + 1];
  for (int64_t j = start; j < end; ++j) {
    const float w = to_float(values[j]);
    const T* src = xt + static_cast<int64_t>(col[j]) * M + m;
    if (kVector) {
      const uint4 raw = *reinterpret_cast<const uint4*>(src);
      const T* vals = reinterpret_cast<const T*>(&raw);
#pragma unroll
      for (int i = 0; i < V; ++i) acc[i] += w * to_float(vals[i]);
    } else {
#pragma unroll
      for (int i = 0; i < V; ++i)
        if (m + i < M) acc[i] += w * to_float(src[i]);
    }
  }
  const float b = bias != nullptr ? to_float(bias[row]) : 0.f;
  T* dst = yt + row * M + m;
#pragma unroll
  for (int i = 0; i < V; ++i)
    if (kVector || m + i < M) dst[i] = from_float<T>(acc[i] + b);
}

template <typename T, typename I>
void launch_typed(const void* xt, const void* values, const int32_t* crow, const void* col,
                  const int32_t* order, const void* bias, void* yt, int64_t M, int64_t N,
                  cudaStream_t stream) {
  constexpr int V = Vec<T>::kWidth;
  const dim3 grid(static_cast<unsigned>((N + kWarpsPerBlock - 1) / kWarpsPerBlock),
                  static_cast<unsigned>((M + 32 * V - 1) / (32 * V)));
  const dim3 block(32 * kWarpsPerBlock);
  auto args = [&](auto kernel) {
    kernel<<<grid, block, 0, stream>>>(static_cast<const T*>(xt), static_cast<const T*>(values), crow,
                                       static_cast<const I*>(col), order, static_cast<const T*>(bias),
                                       static_cast<T*>(yt), M, N);
  };
  if (M % V == 0) {
    args(csr_spmm_kernel<T, I, true>);
  } else {
    args(csr_spmm_kernel<T, I, false>);
  }
}

template <typename T>
void launch_index(bool col16, const void* xt, const void* values, const int32_t* crow, const void* col,
                  const int32_t* order, const void* bias, void* yt, int64_t M, int64_t N,
                  cudaStream_t stream) {
  if (col16) {
    launch_typed<T, int16_t>(xt, values, crow, col, order, bias, yt, M, N, stream);
  } else {
    launch_typed<T, int32_t>(xt, values, crow, col, order, bias, yt, M, N, stream);
  }
}

}  // namespace

// dtype: 0 = float16, 1 = bfloat16, 2 = float32; col16: column indices are int16 (else int32).
cudaError_t csr_spmm_launch(const void* xt, const void* values, const int32_t* crow, const void* col,
                            bool col16, const int32_t* order, const void* bias, void* yt, int64_t M,
                            int64_t N, int dtype, cudaStream_t stream) {
  if (M == 0 || N == 0) return cudaSuccess;
  if (dtype == 0) {
    launch_index<__half>(col16, xt, values, crow, col, order, bias, yt, M, N, stream);
  } else if (dtype == 1) {
    launch_index<__nv_bfloat16>(col16, xt, values, crow, col, order, bias, yt, M, N, stream);
  } else {
    launch_index<float>(col16, xt, values, crow, col, order, bias, yt, M, N, stream);
  }
  return cudaGetLastError();
}

}  // namespace sparse_prune
