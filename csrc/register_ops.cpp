// CUDA implementations of the ops whose schemas are defined in sparse_prune/ops.py.
// Inputs are checked here with messages; kernels launch on the current stream.
#include <Python.h>

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cuda_runtime.h>

#include <tuple>

namespace sparse_prune {

cudaError_t compress_2to4_launch(const void* weight, const uint8_t* mask, void* values,
                                 int16_t* meta, int64_t rows, int64_t cols, int elem_size,
                                 cudaStream_t stream);

std::tuple<at::Tensor, at::Tensor> compress_2to4_cuda(const at::Tensor& weight,
                                                      const at::Tensor& mask) {
  TORCH_CHECK(weight.is_cuda(), "compress_2to4: weight must be a CUDA tensor");
  TORCH_CHECK(mask.device() == weight.device(),
              "compress_2to4: mask must be on the weight's device, got ", mask.device(),
              " and ", weight.device());
  TORCH_CHECK(weight.dim() == 2, "compress_2to4: weight must be 2-D [N, K], got ",
              weight.dim(), "-D");
  TORCH_CHECK(mask.sizes() == weight.sizes(), "compress_2to4: mask shape ", mask.sizes(),
              " must equal weight shape ", weight.sizes());
  TORCH_CHECK(mask.scalar_type() == at::kBool, "compress_2to4: mask must be torch.bool, got ",
              mask.scalar_type());
  const auto dtype = weight.scalar_type();
  TORCH_CHECK(dtype == at::kHalf || dtype == at::kBFloat16 || dtype == at::kFloat,
              "compress_2to4: weight dtype must be float16, bfloat16 or float32, got ", dtype);
  const int64_t rows = weight.size(0);
  const int64_t cols = weight.size(1);
  TORCH_CHECK(cols % 4 == 0, "compress_2to4: K = weight.size(1) must be a multiple of 4, got ",
              cols);

  c10::cuda::CUDAGuard guard(weight.device());
  const at::Tensor w = weight.contiguous();
  const at::Tensor m = mask.contiguous();
  at::Tensor values = at::empty({rows, cols / 2}, w.options());
  at::Tensor meta = at::empty({rows, (cols + 15) / 16}, w.options().dtype(at::kShort));
  const cudaError_t err = compress_2to4_launch(
      w.data_ptr(), reinterpret_cast<const uint8_t*>(m.data_ptr()), values.data_ptr(),
      meta.data_ptr<int16_t>(), rows, cols, static_cast<int>(w.element_size()),
      c10::cuda::getCurrentCUDAStream());
  C10_CUDA_CHECK(err);
  return {values, meta};
}

}  // namespace sparse_prune

TORCH_LIBRARY_IMPL(sparse_prune, CUDA, m) {
  m.impl("compress_2to4", &sparse_prune::compress_2to4_cuda);
}

// A plain Python module: importing sparse_prune._C runs the registrations above.
extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
