// 2:4 compression of a dense weight into values + metadata on the GPU.
//
// No torch headers here on purpose: nvcc on two cores spends most of its time in
// torch/extension.h. The registration and the checks live in register_ops.cpp.
//
// Layout (documented in docs/semi_structured_layout.md, mirrored by
// sparse_prune/kernels/reference.py::compress_2to4):
//   values[r, 2g + s]  the s-th kept element (in column order) of group g = columns 4g..4g+3
//   meta[r, w]         int16; bits 4j..4j+3 describe group 4w + j: bits [1:0] = column of
//                      the first value in its group, bits [3:2] = column of the second one.
// A group with fewer than two kept weights is filled with its lowest unkept columns, whose
// stored values are +0.0, so the two indices are always distinct and increasing.
#include <cstdint>
#include <cuda_runtime.h>

namespace sparse_prune {

template <typename Bits>
__global__ void compress_2to4_kernel(const Bits* __restrict__ weight,
                                     const uint8_t* __restrict__ mask,
                                     Bits* __restrict__ values,
                                     int16_t* __restrict__ meta,
                                     int64_t rows, int64_t cols, int64_t meta_cols) {
  const int64_t idx = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (idx >= rows * meta_cols) return;
  const int64_t r = idx / meta_cols;
  const int64_t word_col = idx - r * meta_cols;
  const Bits* w_row = weight + r * cols;
  const uint8_t* m_row = mask + r * cols;
  Bits* v_row = values + r * (cols / 2);

  uint32_t word = 0;
#pragma unroll
  for (int g = 0; g < 4; ++g) {
    const int64_t c = word_col * 16 + 4 * g;
    if (c >= cols) break;
    uint8_t m[4];
    Bits w[4];
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      m[j] = m_row[c + j];
      w[j] = w_row[c + j];
    }
    int sel[2] = {0, 0};
    int n = 0;
#pragma unroll
    for (int j = 0; j < 4; ++j)
      if (m[j] && n < 2) sel[n++] = j;
#pragma unroll
    for (int j = 0; j < 4; ++j)
      if (!m[j] && n < 2) sel[n++] = j;
    const int a = sel[0] < sel[1] ? sel[0] : sel[1];
    const int b = sel[0] < sel[1] ? sel[1] : sel[0];
    v_row[c / 2] = m[a] ? w[a] : Bits(0);
    v_row[c / 2 + 1] = m[b] ? w[b] : Bits(0);
    word |= static_cast<uint32_t>(a | (b << 2)) << (4 * g);
  }
  meta[r * meta_cols + word_col] = static_cast<int16_t>(static_cast<uint16_t>(word));
}

// Values are only moved, never computed on, so the kernel works on raw bits:
// elem_size 2 covers fp16/bf16, 4 covers fp32.
cudaError_t compress_2to4_launch(const void* weight, const uint8_t* mask, void* values,
                                 int16_t* meta, int64_t rows, int64_t cols, int elem_size,
                                 cudaStream_t stream) {
  const int64_t meta_cols = (cols + 15) / 16;
  const int64_t work = rows * meta_cols;
  if (work == 0) return cudaSuccess;
  const int threads = 256;
  const int64_t blocks = (work + threads - 1) / threads;
  if (elem_size == 2) {
    compress_2to4_kernel<uint16_t><<<blocks, threads, 0, stream>>>(
        static_cast<const uint16_t*>(weight), mask, static_cast<uint16_t*>(values), meta, rows,
        cols, meta_cols);
  } else if (elem_size == 4) {
    compress_2to4_kernel<uint32_t><<<blocks, threads, 0, stream>>>(
        static_cast<const uint32_t*>(weight), mask, static_cast<uint32_t*>(values), meta, rows,
        cols, meta_cols);
  } else {
    return cudaErrorInvalidValue;
  }
  return cudaGetLastError();
}

}  // namespace sparse_prune
