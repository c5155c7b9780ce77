// Torch side of sparse_prune._C_sm90: input checks with messages, workspace from torch's
// allocator, launch on the current stream, TORCH_LIBRARY_IMPL registrations. The schemas are
// defined in Python (sparse_prune/kernels/sm90.py); no CUTLASS header is included here.
#include <Python.h>

#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cstdint>
#include <limits>
#include <memory>
#include <optional>
#include <tuple>
#include <vector>

#include "semi24_sm90.h"

namespace sparse_prune {
namespace {

constexpr const char* kLinear = "semi24_sm90_linear";

bool aligned16(const at::Tensor& t) {
  return reinterpret_cast<std::uintptr_t>(t.data_ptr()) % 16 == 0;
}

int64_t round_up(int64_t v, int64_t m) { return (v + m - 1) / m * m; }

struct DeviceInfo {
  int major = 0, minor = 0, sm_count = 0;
};

// Compute capability and SM count of `device`, queried once per device (attribute reads only;
// ATen/cuda/CUDAContext.h is avoided: it needs cusparse.h, absent from some toolkits).
const DeviceInfo& device_info(int device) {
  constexpr int kMaxDevices = 64;
  static DeviceInfo cache[kMaxDevices];
  static bool known[kMaxDevices] = {};
  TORCH_CHECK(device >= 0 && device < kMaxDevices, "semi24_sm90_linear: device index ", device);
  if (!known[device]) {
    DeviceInfo info;
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&info.major, cudaDevAttrComputeCapabilityMajor, device));
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&info.minor, cudaDevAttrComputeCapabilityMinor, device));
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&info.sm_count, cudaDevAttrMultiProcessorCount, device));
    cache[device] = info;
    known[device] = true;
  }
  return cache[device];
}

// Y [M, N] = X [M, K] · Wᵀ (+ bias) (GELU, exact erf) with W 2:4 sparse on Hopper (wgmma.sp).
//   a: [round_up(N, 8), K/2], our SemiStructured values (= CUTLASS's compressed A, unchanged),
//      zero rows appended when N % 8 != 0 (sparse_prune.kernels.sm90.pack does it once)
//   e: uint8 metadata in CUTLASS's sm90 layout, from semi24_sm90_pack(meta, K)
//   activation: 0 none, 1 GELU (erf); tile: -1 auto (by M), 0 = 128x128x128, 1 = 128x64x128
// The GEMM runs over round_up(N, 8) rows of W: TMA stores need 16-byte columns of D (= rows of
// Y), so for N % 8 != 0 Y is computed with a padded row stride and then narrowed (one copy).
at::Tensor semi24_sm90_linear(const at::Tensor& x, const at::Tensor& values, const at::Tensor& e,
                              int64_t out_features, const std::optional<at::Tensor>& bias,
                              int64_t activation, int64_t tile) {
  TORCH_CHECK(sm90::compiled(), kLinear,
              ": this build has no CUTLASS sm90 sparse GEMM (CUDA toolkit < 12.2 at build time)");
  TORCH_CHECK(x.is_cuda(), kLinear, ": x must be a CUDA tensor, got ", x.device());
  TORCH_CHECK(values.device() == x.device() && e.device() == x.device(), kLinear,
              ": a and e must be on x's device (", x.device(), "), got ", values.device(),
              " and ", e.device());
  TORCH_CHECK(x.dim() == 2, kLinear, ": x must be 2-D [M, K], got ", x.dim(), "-D");
  TORCH_CHECK(values.dim() == 2, kLinear, ": a must be 2-D [round_up(N, 8), K/2], got ",
              values.dim(), "-D");
  const auto dtype = x.scalar_type();
  TORCH_CHECK(dtype == at::kHalf || dtype == at::kBFloat16, kLinear,
              ": dtype must be float16 or bfloat16 (sparse tensor cores), got ", dtype);
  TORCH_CHECK(values.scalar_type() == dtype, kLinear, ": a dtype ", values.scalar_type(),
              " must equal x dtype ", dtype);
  TORCH_CHECK(activation == 0 || activation == 1, kLinear,
              ": activation must be 0 (none) or 1 (GELU, erf), got ", activation);
  TORCH_CHECK(tile >= -1 && tile < sm90::kNumTiles, kLinear, ": tile must be -1 (auto), 0 "
              "(128x128x128) or 1 (128x64x128), got ", tile);
  const int64_t M = x.size(0), K = x.size(1), N = out_features;
  TORCH_CHECK(N > 0, kLinear, ": out_features must be positive, got ", N);
  TORCH_CHECK(K > 0 && K % 16 == 0, kLinear, ": K = x.size(1) = ", K,
              " must be a positive multiple of 16 (16-byte TMA rows of the compressed weight)");
  const int64_t ldy = round_up(N, 8);
  TORCH_CHECK(values.size(0) == ldy && values.size(1) * 2 == K, kLinear,
              ": a must be [round_up(N, 8), K/2] = [", ldy, ", ", K / 2, "] (sm90.pack), got ",
              values.sizes());
  constexpr int64_t kIntMax = std::numeric_limits<int>::max();
  TORCH_CHECK(M <= kIntMax && round_up(N, 64) <= kIntMax && K <= kIntMax, kLinear,
              ": sizes must fit int32, got M = ", M, ", N = ", N, ", K = ", K);
  int64_t e_rows = 0, e_cols = 0;
  sm90::e_shape(static_cast<int>(N), static_cast<int>(K), &e_rows, &e_cols);
  TORCH_CHECK(e.scalar_type() == at::kByte && e.dim() == 2 && e.size(0) == e_rows &&
                  e.size(1) == e_cols,
              kLinear, ": e must be uint8 [", e_rows, ", ", e_cols,
              "] (semi24_sm90_pack(meta, K)), got ", e.scalar_type(), " ", e.sizes());
  TORCH_CHECK(values.is_contiguous() && aligned16(values), kLinear,
              ": a must be contiguous and 16-byte aligned (pack it once, at convert time)");
  TORCH_CHECK(e.is_contiguous() && aligned16(e), kLinear,
              ": e must be contiguous and 16-byte aligned");
  if (bias.has_value()) {
    TORCH_CHECK(bias->device() == x.device(), kLinear, ": bias must be on x's device");
    TORCH_CHECK(bias->scalar_type() == dtype, kLinear, ": bias dtype ", bias->scalar_type(),
                " must equal x dtype ", dtype);
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == N, kLinear, ": bias must be [", N,
                "], got ", bias->sizes());
    TORCH_CHECK(bias->is_contiguous(), kLinear, ": bias must be contiguous");
  }

  c10::cuda::CUDAGuard guard(x.device());
  const DeviceInfo& dev = device_info(x.get_device());
  TORCH_CHECK(dev.major == 9 && dev.minor == 0, kLinear,
              ": needs an sm_90 GPU (H100/H200: the kernel is built for sm_90a only), this GPU is "
              "sm_", dev.major, dev.minor, "; use the 'cuda' (mma.sp) backend");
  if (M == 0) return at::empty({0, N}, x.options());

  // X is read by TMA: contiguous rows and a 16-byte aligned base (a fresh copy otherwise).
  at::Tensor xc = x.contiguous();
  if (!aligned16(xc)) xc = xc.clone();
  // Y is D column-major with leading dimension ldy: TMA stores need ldy % 8 == 0 (16 bytes).
  at::Tensor y = at::empty({M, ldy}, x.options());
  // The bias is read for all ldy rows of the GEMM: pad it when N % 8 != 0 (N elements).
  at::Tensor bias_c;
  if (bias.has_value()) {
    bias_c = *bias;
    if (ldy != N) {
      bias_c = at::zeros({ldy}, bias->options());
      bias_c.narrow(0, 0, N).copy_(*bias);
    }
  }

  sm90::GemmArgs args;
  args.x = xc.data_ptr();
  args.a = values.data_ptr();
  args.e = e.data_ptr();
  args.bias = bias_c.defined() ? bias_c.data_ptr() : nullptr;
  args.y = y.data_ptr();
  args.n = static_cast<int>(ldy);
  args.tokens = static_cast<int>(M);
  args.k = static_cast<int>(K);
  args.ldy = ldy;
  args.sm_count = dev.sm_count;
  args.device = x.get_device();
  args.gelu = activation == 1;

  int config = static_cast<int>(tile);
  if (config < 0) {
    // Large tiles unless they leave SMs idle in the first wave; then 128x64 doubles the tiles.
    const int64_t large_tiles = ((ldy + 127) / 128) * ((M + 127) / 128);
    config = large_tiles < dev.sm_count ? sm90::kTile128x64 : sm90::kTile128x128;
  }
  const int dt = dtype == at::kHalf ? sm90::kFloat16 : sm90::kBFloat16;
  const int64_t ws_bytes = sm90::workspace_size(dt, config, args);
  TORCH_CHECK(ws_bytes >= 0, kLinear, ": CUTLASS cannot run M = ", M, ", N = ", N, ", K = ", K,
              " with tile config ", config, " (can_implement failed)");
  at::Tensor workspace;
  if (ws_bytes > 0) workspace = at::empty({ws_bytes}, x.options().dtype(at::kByte));
  const char* err = sm90::run(dt, config, args, ws_bytes > 0 ? workspace.data_ptr() : nullptr,
                              c10::cuda::getCurrentCUDAStream());
  TORCH_CHECK(err == nullptr, kLinear, ": ", err);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return ldy == N ? y : y.narrow(1, 0, N).contiguous();
}

// Test oracle: CUTLASS's own sm90 compressor on a dense 2:4 weight (fp16 or bf16: it only
// tests bit patterns against zero, ignoring the sign, so the fp16 instantiation serves both).
std::tuple<at::Tensor, at::Tensor> semi24_sm90_cutlass_compress(const at::Tensor& weight) {
  const char* op = "semi24_sm90_cutlass_compress";
  TORCH_CHECK(sm90::compiled(), op, ": built without the sm90 sparse GEMM");
  TORCH_CHECK(weight.is_cuda(), op, ": weight must be a CUDA tensor, got ", weight.device());
  TORCH_CHECK(weight.dim() == 2, op, ": weight must be 2-D [N, K], got ", weight.dim(), "-D");
  TORCH_CHECK(weight.scalar_type() == at::kHalf || weight.scalar_type() == at::kBFloat16, op,
              ": weight must be float16 or bfloat16, got ", weight.scalar_type());
  const int64_t m = weight.size(0), k = weight.size(1);
  TORCH_CHECK(m > 0 && k > 0 && k % 16 == 0 && m <= (int64_t{1} << 30) && k <= (int64_t{1} << 30),
              op, ": need N > 0 and K a positive multiple of 16, got ", weight.sizes());
  c10::cuda::CUDAGuard guard(weight.device());
  const DeviceInfo& dev = device_info(weight.get_device());
  TORCH_CHECK(dev.major == 9 && dev.minor == 0, op, ": needs an sm_90 GPU, this GPU is sm_",
              dev.major, dev.minor);
  const at::Tensor w = weight.contiguous();
  int64_t e_rows = 0, e_cols = 0;
  sm90::e_shape(static_cast<int>(m), static_cast<int>(k), &e_rows, &e_cols);
  at::Tensor a = at::zeros({m, k / 2}, w.options());
  at::Tensor e = at::zeros({e_rows, e_cols}, w.options().dtype(at::kByte));
  sm90::CompressArgs args;
  args.dense = w.data_ptr();
  args.a = a.data_ptr();
  args.e = e.data_ptr();
  args.m = static_cast<int>(m);
  args.k = static_cast<int>(k);
  args.device = weight.get_device();
  args.sm_count = dev.sm_count;
  const int64_t ws_bytes = sm90::compress_workspace_size(args);
  TORCH_CHECK(ws_bytes >= 0, op, ": CUTLASS's compressor cannot take ", weight.sizes());
  at::Tensor workspace;
  if (ws_bytes > 0) workspace = at::empty({ws_bytes}, w.options().dtype(at::kByte));
  const char* err = sm90::compress(args, ws_bytes > 0 ? workspace.data_ptr() : nullptr,
                                   c10::cuda::getCurrentCUDAStream());
  TORCH_CHECK(err == nullptr, op, ": ", err);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {a, e};
}

// Host-only (no GPU): CuTe's offsets of the layouts the kernels read, for the layout tests.
std::tuple<at::Tensor, at::Tensor> semi24_sm90_layout(int64_t rows, int64_t cols) {
  TORCH_CHECK(sm90::compiled(), "semi24_sm90_layout: built without the sm90 sparse GEMM");
  TORCH_CHECK(rows > 0 && cols > 0 && cols % 16 == 0 && rows * cols <= (int64_t{1} << 26),
              "semi24_sm90_layout: rows > 0 and cols a positive multiple of 16 (small), got ",
              rows, " x ", cols);
  at::Tensor a_off = at::empty({rows, cols / 2}, at::TensorOptions().dtype(at::kLong));
  at::Tensor e_off = at::empty({rows, cols / 8}, at::TensorOptions().dtype(at::kLong));
  sm90::layout_offsets(static_cast<int>(rows), static_cast<int>(cols), a_off.data_ptr<int64_t>(),
                       e_off.data_ptr<int64_t>());
  return {a_off, e_off};
}

}  // namespace
}  // namespace sparse_prune

// Registered by a function Python calls after checking abi_version() (as sparse_prune._C does):
// a stale build raises a Python error instead of aborting the interpreter at import.
#define SPARSE_PRUNE_SM90_ABI 1  // bump with every schema change in sparse_prune/kernels/sm90.py

namespace {

std::vector<std::unique_ptr<torch::Library>>& libraries() {
  static std::vector<std::unique_ptr<torch::Library>> held;
  return held;
}

PyObject* register_kernels(PyObject*, PyObject*) {
  try {
    if (libraries().empty()) {
      auto cuda = std::make_unique<torch::Library>(torch::Library::IMPL, "sparse_prune",
                                                   c10::DispatchKey::CUDA, __FILE__, __LINE__);
      cuda->impl("semi24_sm90_linear", &sparse_prune::semi24_sm90_linear);
      cuda->impl("semi24_sm90_cutlass_compress", &sparse_prune::semi24_sm90_cutlass_compress);
      auto host = std::make_unique<torch::Library>(torch::Library::IMPL, "sparse_prune",
                                                   c10::DispatchKey::CompositeExplicitAutograd,
                                                   __FILE__, __LINE__);
      host->impl("semi24_sm90_layout", &sparse_prune::semi24_sm90_layout);
      libraries().push_back(std::move(cuda));
      libraries().push_back(std::move(host));
    }
  } catch (const std::exception& e) {  // partial registrations are undone with the locals
    PyErr_SetString(PyExc_RuntimeError, e.what());
    return nullptr;
  }
  Py_RETURN_NONE;
}

PyObject* abi_version(PyObject*, PyObject*) { return PyLong_FromLong(SPARSE_PRUNE_SM90_ABI); }

PyMethodDef methods[] = {
    {"register_kernels", register_kernels, METH_NOARGS,
     "Register the Hopper 2:4 kernels of sparse_prune's sm90 ops (idempotent)."},
    {"abi_version", abi_version, METH_NOARGS, "The op-schema version these kernels were built for."},
    {nullptr, nullptr, 0, nullptr}};

}  // namespace

extern "C" PyObject* PyInit__C_sm90(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C_sm90", nullptr, -1, methods};
  return PyModule_Create(&module_def);
}
