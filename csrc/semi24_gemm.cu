// 2:4 GEMM on sparse tensor cores: Y [M, N] = X [M, K] · Wᵀ (+ bias), W in our SemiStructured
// layout (docs/semi_structured_layout.md): values [N, K/2], int16 meta [N, K/16].
//
// Computed as Yᵀ = W · Xᵀ so that the sparse operand is A of mma.sp.m16n8k16 (row-major A =
// W rows, column-major B = Xᵀ, i.e. X rows as stored). Our metadata needs no reordering: one
// int16 word holds the four nibbles of one row's 16-column K step in the order the instruction
// wants, so a thread's metadata register is meta[row g] | meta[row g + 8] << 16 (selector 0,
// lane 4g supplies it). Fragment ownership (PTX ISA, sparse mma.m16n8k16 .f16/.bf16):
//   A: reg0 = row g, stored pair of 4-wide chunk t; reg1 = row g + 8, same chunk (g = lane/4,
//      t = lane%4) -> values[row, k0/2 + 2t .. +1], one 32-bit load each.
//   B: reg0 = k rows 2t, 2t+1 of column g; reg1 = k rows 8 + 2t, 8 + 2t + 1 -> X[m, k0 + ...].
//   D (f32): d0, d1 = (row g, cols 2t, 2t+1); d2, d3 = (row g + 8, same cols).
// No torch headers here; register_ops.cpp checks inputs and launches on the current stream.
// Requires K % 16 == 0, x and values 4-byte aligned (their 32-bit loads; ops.py copies a
// misaligned view once, register_ops.cpp refuses one), valid metadata (every nibble two
// increasing indices: anything else is undefined under ::ordered_metadata; ops.py validates
// each meta tensor once) and compute capability >= 8.0 (checked there). Any M and N: rows past the end are clamped on load and
// not stored.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

namespace sparse_prune {
namespace {

constexpr int kWarps = 4;        // warps per block, each owns 16 weight rows
constexpr int kBlockN = 16 * kWarps;
constexpr int kTilesM = 8;       // mma tiles of 8 X rows per warp
constexpr int kBlockM = 8 * kTilesM;

// Our metadata always stores first index < second, so the ordered form applies; ptxas
// advises it (the plain .sp form is expected to be slower on future architectures).
#if (__CUDACC_VER_MAJOR__ > 12) || (__CUDACC_VER_MAJOR__ == 12 && __CUDACC_VER_MINOR__ >= 5)
#define SPARSE_PRUNE_MMA_SP "mma.sp::ordered_metadata"
#else
#define SPARSE_PRUNE_MMA_SP "mma.sp"
#endif

// Built for an arch without sparse tensor cores (< sm_80), the kernel must not run: it traps
// (the launch fails with an error) instead of writing a result without the product. The host
// side (register_ops.cpp, ops.py) refuses compute capability < 8.0 before any launch, so this
// is the last line only; the build targets sm_80 and sm_90 (TORCH_CUDA_ARCH_LIST).
#define SPARSE_PRUNE_NO_MMA_SP() __trap()

template <typename T>
struct MmaSp;

template <>
struct MmaSp<__half> {
  __device__ static void run(float (&d)[4], uint32_t a0, uint32_t a1, uint32_t b0, uint32_t b1,
                             uint32_t e) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
    asm volatile(
        SPARSE_PRUNE_MMA_SP ".sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 "
        "{%0, %1, %2, %3}, {%4, %5}, {%6, %7}, {%0, %1, %2, %3}, %8, 0x0;\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a0), "r"(a1), "r"(b0), "r"(b1), "r"(e));
#elif defined(__CUDA_ARCH__)
    SPARSE_PRUNE_NO_MMA_SP();
#endif
  }
};

template <>
struct MmaSp<__nv_bfloat16> {
  __device__ static void run(float (&d)[4], uint32_t a0, uint32_t a1, uint32_t b0, uint32_t b1,
                             uint32_t e) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
    asm volatile(
        SPARSE_PRUNE_MMA_SP ".sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 "
        "{%0, %1, %2, %3}, {%4, %5}, {%6, %7}, {%0, %1, %2, %3}, %8, 0x0;\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a0), "r"(a1), "r"(b0), "r"(b1), "r"(e));
#elif defined(__CUDA_ARCH__)
    SPARSE_PRUNE_NO_MMA_SP();
#endif
  }
};

__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }
template <typename T>
__device__ __forceinline__ T from_float(float v);
template <>
__device__ __forceinline__ __half from_float<__half>(float v) { return __float2half_rn(v); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}

__device__ __forceinline__ uint32_t load32(const void* p) {
  return *reinterpret_cast<const uint32_t*>(p);
}

template <typename T>
__global__ void __launch_bounds__(32 * kWarps)
    semi24_gemm_kernel(const T* __restrict__ x, const T* __restrict__ values,
                       const int16_t* __restrict__ meta, const T* __restrict__ bias,
                       T* __restrict__ y, int64_t M, int64_t N, int64_t K) {
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  const int g = lane >> 2;
  const int t = lane & 3;
  const int64_t n0 = static_cast<int64_t>(blockIdx.y) * kBlockN + warp * 16;
  const int64_t m0 = static_cast<int64_t>(blockIdx.x) * kBlockM;
  if (n0 >= N) return;  // whole warp past the last weight row

  const int64_t half_k = K / 2;
  const int64_t words = K / 16;
  const int64_t row_a = min(n0 + g, N - 1);
  const int64_t row_b = min(n0 + g + 8, N - 1);
  const T* va = values + row_a * half_k + 2 * t;
  const T* vb = values + row_b * half_k + 2 * t;
  const uint16_t* ma = reinterpret_cast<const uint16_t*>(meta) + row_a * words;
  const uint16_t* mb = reinterpret_cast<const uint16_t*>(meta) + row_b * words;
  const T* xrow[kTilesM];
#pragma unroll
  for (int j = 0; j < kTilesM; ++j) {
    const int64_t m = min(m0 + 8 * j + g, M - 1);
    xrow[j] = x + m * K + 2 * t;
  }

  float acc[kTilesM][4];
#pragma unroll
  for (int j = 0; j < kTilesM; ++j) acc[j][0] = acc[j][1] = acc[j][2] = acc[j][3] = 0.f;

  for (int64_t k0 = 0; k0 < K; k0 += 16) {
    const uint32_t a0 = load32(va + k0 / 2);
    const uint32_t a1 = load32(vb + k0 / 2);
    const uint32_t e = static_cast<uint32_t>(ma[k0 / 16]) | (static_cast<uint32_t>(mb[k0 / 16]) << 16);
#pragma unroll
    for (int j = 0; j < kTilesM; ++j) {
      const uint32_t b0 = load32(xrow[j] + k0);
      const uint32_t b1 = load32(xrow[j] + k0 + 8);
      MmaSp<T>::run(acc[j], a0, a1, b0, b1, e);
    }
  }

  const int64_t na = n0 + g;
  const int64_t nb = n0 + g + 8;
  const float bias_a = (bias != nullptr && na < N) ? to_float(bias[na]) : 0.f;
  const float bias_b = (bias != nullptr && nb < N) ? to_float(bias[nb]) : 0.f;
#pragma unroll
  for (int j = 0; j < kTilesM; ++j) {
#pragma unroll
    for (int c = 0; c < 2; ++c) {
      const int64_t m = m0 + 8 * j + 2 * t + c;
      if (m >= M) continue;
      if (na < N) y[m * N + na] = from_float<T>(acc[j][c] + bias_a);
      if (nb < N) y[m * N + nb] = from_float<T>(acc[j][2 + c] + bias_b);
    }
  }
}

}  // namespace

// dtype: 0 = float16, 1 = bfloat16. Returns the launch error (cudaSuccess when launched).
cudaError_t semi24_gemm_launch(const void* x, const void* values, const int16_t* meta,
                               const void* bias, void* y, int64_t M, int64_t N, int64_t K,
                               int dtype, cudaStream_t stream) {
  if (M == 0 || N == 0) return cudaSuccess;
  const dim3 grid(static_cast<unsigned>((M + kBlockM - 1) / kBlockM),
                  static_cast<unsigned>((N + kBlockN - 1) / kBlockN));
  const dim3 block(32 * kWarps);
  if (dtype == 0) {
    semi24_gemm_kernel<__half><<<grid, block, 0, stream>>>(
        static_cast<const __half*>(x), static_cast<const __half*>(values), meta,
        static_cast<const __half*>(bias), static_cast<__half*>(y), M, N, K);
  } else {
    semi24_gemm_kernel<__nv_bfloat16><<<grid, block, 0, stream>>>(
        static_cast<const __nv_bfloat16*>(x), static_cast<const __nv_bfloat16*>(values), meta,
        static_cast<const __nv_bfloat16*>(bias), static_cast<__nv_bfloat16*>(y), M, N, K);
  }
  return cudaGetLastError();
}

}  // namespace sparse_prune
