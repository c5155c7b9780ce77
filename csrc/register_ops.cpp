// CUDA implementations of the ops whose schemas are defined in sparse_prune/ops.py.
// Inputs are checked here with messages; kernels launch on the current stream.
#include <Python.h>

#include <ATen/core/Tensor.h>
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cuda_runtime.h>

#include <memory>
#include <optional>
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

cudaError_t semi24_gemm_launch(const void* x, const void* values, const int16_t* meta,
                               const void* bias, void* y, int64_t M, int64_t N, int64_t K,
                               int dtype, cudaStream_t stream);
cudaError_t csr_spmm_launch(const void* xt, const void* values, const int32_t* crow,
                            const void* col, bool col16, const int32_t* order, const void* bias,
                            void* yt, int64_t M, int64_t N, int dtype, cudaStream_t stream);

namespace {

void check_common(const char* op, const at::Tensor& x, const at::Tensor& values,
                  const std::optional<at::Tensor>& bias, int64_t out_features) {
  TORCH_CHECK(x.is_cuda(), op, ": x must be a CUDA tensor, got ", x.device());
  TORCH_CHECK(values.device() == x.device(), op, ": values must be on x's device (", x.device(),
              "), got ", values.device());
  TORCH_CHECK(x.dim() == 2, op, ": x must be 2-D [M, K], got ", x.dim(), "-D");
  TORCH_CHECK(values.scalar_type() == x.scalar_type(), op, ": values dtype ",
              values.scalar_type(), " must equal x dtype ", x.scalar_type());
  if (bias.has_value()) {
    TORCH_CHECK(bias->device() == x.device(), op, ": bias must be on x's device");
    TORCH_CHECK(bias->scalar_type() == x.scalar_type(), op, ": bias dtype must equal x dtype");
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == out_features, op, ": bias must be [",
                out_features, "], got ", bias->sizes());
  }
}

int dtype_code(const at::Tensor& x) {
  switch (x.scalar_type()) {
    case at::kHalf: return 0;
    case at::kBFloat16: return 1;
    default: return 2;
  }
}

}  // namespace

// Y = X · Wᵀ (+ b) with W in 2:4 layout, on sparse tensor cores (sm_80+; fp16/bf16). The CUDA
// kernel of the private op semi24_linear_mma_sp: sparse_prune.ops' CUDA implementation of
// semi24_linear validates the metadata once per tensor and aligns x/values, then calls it.
at::Tensor semi24_linear_cuda(const at::Tensor& x, const at::Tensor& values, const at::Tensor& meta,
                              const std::optional<at::Tensor>& bias, bool gelu) {
  const char* op = "semi24_linear (CUDA, mma.sp)";
  TORCH_CHECK(values.dim() == 2, op, ": values must be 2-D [N, K/2], got ", values.sizes());
  check_common(op, x, values, bias, values.size(0));
  TORCH_CHECK(x.scalar_type() == at::kHalf || x.scalar_type() == at::kBFloat16, op,
              ": dtype must be float16 or bfloat16 (sparse tensor cores), got ", x.scalar_type());
  const int64_t M = x.size(0), K = x.size(1), N = values.size(0);
  TORCH_CHECK(K % 16 == 0 && K > 0, op, ": K = ", K,
              " must be a positive multiple of 16 (one mma.sp K step); use the triton or torch backend");
  TORCH_CHECK(values.size(1) * 2 == K, op, ": values must be [N, K/2] = [", N, ", ", K / 2,
              "], got ", values.sizes());
  TORCH_CHECK(meta.device() == x.device() && meta.scalar_type() == at::kShort && meta.dim() == 2 &&
                  meta.size(0) == N && meta.size(1) == K / 16,
              op, ": meta must be int16 [", N, ", ", K / 16, "] on x's device, got ",
              meta.scalar_type(), " ", meta.sizes());
  c10::cuda::CUDAGuard guard(x.device());
  int major = 0, minor = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, x.get_device()));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, x.get_device()));
  TORCH_CHECK_VALUE(major >= 8, op, ": needs compute capability 8.0 or newer (sparse tensor cores); device ",
                    x.get_device(), " is ", major, ".", minor, ": use backend='triton'");
  const at::Tensor xc = x.contiguous(), vc = values.contiguous(), mc = meta.contiguous();
  // 32-bit loads of x and values: a view whose storage offset breaks 4-byte alignment would
  // fault. sparse_prune.ops copies such a view once before calling this op.
  for (const at::Tensor* t : {&xc, &vc}) {
    TORCH_CHECK_VALUE(reinterpret_cast<uintptr_t>(t->data_ptr()) % 4 == 0, op, ": ",
                      t == &xc ? "x" : "values", " must be 4-byte aligned (storage offset ",
                      t->storage_offset(), "): call sparse_prune::semi24_linear, which copies it once");
  }
  const at::Tensor bc = bias.has_value() ? bias->contiguous() : at::Tensor();
  at::Tensor y = at::empty({M, N}, x.options());
  C10_CUDA_CHECK(semi24_gemm_launch(xc.data_ptr(), vc.data_ptr(), mc.data_ptr<int16_t>(),
                                    bc.defined() ? bc.data_ptr() : nullptr, y.data_ptr(), M, N, K,
                                    dtype_code(xc), c10::cuda::getCurrentCUDAStream()));
  // gelu: no epilogue of its own yet; the exact GELU in place, on the same stream
  return gelu ? at::gelu_(y) : y;
}

// Y = X · Wᵀ (+ b) with W in CSR (int32 crow, int32/int16 col), fp16/bf16/fp32.
// row_order: rows longest-first, int32 [N] (formats.CSR.row_order), computed once per layer.
at::Tensor csr_linear_cuda(const at::Tensor& x, const at::Tensor& values, const at::Tensor& crow,
                           const at::Tensor& col, int64_t out_features,
                           const std::optional<at::Tensor>& bias,
                           const std::optional<at::Tensor>& row_order, bool gelu) {
  const char* op = "csr_linear (CUDA)";
  check_common(op, x, values, bias, out_features);
  const auto dt = x.scalar_type();
  TORCH_CHECK(dt == at::kHalf || dt == at::kBFloat16 || dt == at::kFloat, op,
              ": dtype must be float16, bfloat16 or float32, got ", dt);
  TORCH_CHECK(crow.device() == x.device() && col.device() == x.device(), op,
              ": crow_indices and col_indices must be on x's device");
  TORCH_CHECK(crow.scalar_type() == at::kInt && crow.dim() == 1 && crow.size(0) == out_features + 1,
              op, ": crow_indices must be int32 [out_features + 1 = ", out_features + 1, "], got ",
              crow.scalar_type(), " ", crow.sizes());
  TORCH_CHECK((col.scalar_type() == at::kInt || col.scalar_type() == at::kShort) && col.dim() == 1,
              op, ": col_indices must be 1-D int32 or int16, got ", col.scalar_type());
  TORCH_CHECK(values.dim() == 1 && values.size(0) == col.size(0), op,
              ": values and col_indices must both hold nnz entries, got ", values.sizes(), " and ",
              col.sizes());
  c10::cuda::CUDAGuard guard(x.device());
  const int64_t M = x.size(0), N = out_features;
  const at::Tensor xt = x.t().contiguous();  // [K, M]: each stored weight reads a contiguous run
  const at::Tensor crow_c = crow.contiguous();
  at::Tensor order;
  if (row_order.has_value()) {
    TORCH_CHECK(row_order->device() == x.device() && row_order->scalar_type() == at::kInt &&
                    row_order->dim() == 1 && row_order->size(0) == N,
                op, ": row_order must be int32 [", N, "] on x's device (formats.CSR.row_order), got ",
                row_order->scalar_type(), " ", row_order->sizes());
    order = row_order->contiguous();
  } else {  // rows longest-first, as formats.CSR.row_order (SparseLinear passes it precomputed)
    const at::Tensor lengths = crow_c.slice(0, 1) - crow_c.slice(0, 0, N);
    order = std::get<1>(lengths.sort(/*stable=*/true, /*dim=*/0, /*descending=*/true)).to(at::kInt);
  }
  const at::Tensor vc = values.contiguous(), cc = col.contiguous();
  const at::Tensor bc = bias.has_value() ? bias->contiguous() : at::Tensor();
  at::Tensor yt = at::empty({N, M}, x.options());
  C10_CUDA_CHECK(csr_spmm_launch(xt.data_ptr(), vc.data_ptr(), crow_c.data_ptr<int32_t>(),
                                 cc.data_ptr(), cc.scalar_type() == at::kShort,
                                 order.data_ptr<int32_t>(), bc.defined() ? bc.data_ptr() : nullptr,
                                 yt.data_ptr(), M, N, dtype_code(x), c10::cuda::getCurrentCUDAStream()));
  at::Tensor y = yt.t().contiguous();
  return gelu ? at::gelu_(y) : y;  // gelu: after the product (no fused epilogue here yet)
}

}  // namespace sparse_prune

// Registration is a function Python calls after it has checked abi_version(), not a static
// TORCH_LIBRARY_IMPL: a library built from older sources whose signatures no longer match the
// schemas in ops.py then raises a Python RuntimeError instead of aborting the interpreter at
// import (seen: a stale build aborted `import sparse_prune` in another checkout).
#define SPARSE_PRUNE_ABI 4  // bump with every schema change in sparse_prune/ops.py

namespace {

std::unique_ptr<torch::Library>& cuda_library() {
  static std::unique_ptr<torch::Library> library;
  return library;
}

PyObject* register_kernels(PyObject*, PyObject*) {
  try {
    if (!cuda_library()) {
      auto library = std::make_unique<torch::Library>(torch::Library::IMPL, "sparse_prune",
                                                      c10::DispatchKey::CUDA, __FILE__, __LINE__);
      // The public ops' CUDA kernels (schemas in sparse_prune/ops.py).
      library->impl("compress_2to4", &sparse_prune::compress_2to4_cuda);
      library->impl("semi24_linear_mma_sp", &sparse_prune::semi24_linear_cuda);
      library->impl("csr_linear", &sparse_prune::csr_linear_cuda);
      cuda_library() = std::move(library);
    }
  } catch (const std::exception& e) {  // a partial registration is undone with `library`
    PyErr_SetString(PyExc_RuntimeError, e.what());
    return nullptr;
  }
  Py_RETURN_NONE;
}

PyObject* abi_version(PyObject*, PyObject*) { return PyLong_FromLong(SPARSE_PRUNE_ABI); }

PyMethodDef methods[] = {
    {"register_kernels", register_kernels, METH_NOARGS,
     "Register the CUDA kernels of sparse_prune's ops (idempotent)."},
    {"abi_version", abi_version, METH_NOARGS, "The op-schema version these kernels were built for."},
    {nullptr, nullptr, 0, nullptr}};

}  // namespace

extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, methods};
  return PyModule_Create(&module_def);
}
