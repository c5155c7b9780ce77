"""Which kernel runs a layer: backend resolution per device, the candidates ``format="auto"``
may time, and the one table ``(format, backend) -> kernel``.

Backends a user asks for (:data:`~sparse_prune.constants.BACKENDS`):

* ``"auto"`` — on the CPU, ``torch``: the op's CPU kernel, which is ours for csr/bsr/2:4
  (csrc/cpu/: AVX-512, AVX2+FMA or portable, bias and GELU fused; :func:`sparse_prune.ops.cpu_isa`) and
  the reference (rebuild + ``F.linear``) where that library is not loaded; on CUDA, our csrc/ kernel where it fits, else
  our Triton kernel where it fits, else ``dense``: the masked weight materialized once and run
  by cuBLAS. ``auto`` never rebuilds the weight per call on a GPU.
* ``"torch"`` — the op's CPU kernel on the CPU (above); the reference elsewhere. On CUDA it rebuilds the dense weight on every call; that is
  only ever done when asked for, and warns once.
* ``"triton"`` / ``"cuda"`` — our Triton / csrc/ kernel; ``ValueError`` naming the reason
  where it cannot run or cannot take the weight.
* ``"cuda:sm90"`` — 2:4 on our CUTLASS sm90a kernel (``wgmma.sp``, TMA; ``sparse_prune._C_sm90``),
  Hopper GPUs only; its metadata is repacked once when the layer is bound to the GPU, and it
  fuses bias and GELU in its epilogue. ``"auto"`` prefers it on an H100/H200.
* ``"cusparselt"`` — 2:4 through torch's cuSPARSELt binding (``torch._cslt_compress`` once,
  the algorithm searched once with ``torch._cslt_sparse_mm_search`` when the layer is bound to
  a CUDA device, ``torch._cslt_sparse_mm`` per call). torch still builds a cuSPARSELt plan
  inside every ``_cslt_sparse_mm`` call; that host cost is not ours to remove.

A resolved backend is one of :data:`~sparse_prune.constants.RESOLVED_BACKENDS`. Kernels are
plain functions ``(x [M, K], layer) -> y [M, N]`` reading the layer's buffers, so modules can be
deep-copied, pickled and compiled.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from sparse_prune import ops
from sparse_prune.constants import (
    BACKEND_FORMATS,
    BACKENDS,
    BSR_BLOCK_SIDES,
    CUSPARSELT_ROW_MULTIPLE,
    CUSPARSELT_SEARCH_ROWS,
    CUSPARSELT_WEIGHT_MULTIPLE,
    MMA_SP_K_STEP,
)
from sparse_prune.kernels import reference, triton_common

TORCH_ON_CUDA_WARNING = ("backend='torch' on CUDA rebuilds the dense weight on every call (the reference "
                         "path): slower than dense; use backend='auto' for our kernels or cuBLAS")


# ---------------------------------------------------------------------------------------
# Why a backend cannot run a weight (None: it can)


def triton_reason(format_name: str, fmt: Any = None, block: tuple[int, ...] | None = None) -> str | None:
    """Why our Triton kernel cannot take this weight, or None (availability not included)."""
    if format_name == "bsr":
        block = tuple(fmt.block) if fmt is not None else block
        if block is not None and any(side not in BSR_BLOCK_SIDES for side in block):
            return f"block {block} (each side must be one of {BSR_BLOCK_SIDES})"
    if fmt is not None and fmt.dtype == torch.float64:
        return "dtype float64 (kernels take float16, bfloat16, float32)"
    return None


def cuda_reason(format_name: str, fmt: Any = None) -> str | None:
    """Why our csrc/ kernel cannot take this weight, or None."""
    if not ops.has_cuda_extension():
        return f"the CUDA extension is not loaded ({ops.extension_error()})"
    if format_name == "dense":
        return None
    if format_name not in BACKEND_FORMATS["cuda"]:
        return (f"no CUDA kernel for format {format_name!r} (kernels: {', '.join(BACKEND_FORMATS['cuda'])}; "
                "try 'triton')")
    if fmt is not None:
        if fmt.dtype == torch.float64:
            return "dtype float64 (kernels take float16, bfloat16, float32)"
        if format_name == "2:4":
            if fmt.shape[1] % MMA_SP_K_STEP:
                return f"in_features = {fmt.shape[1]} is not a multiple of {MMA_SP_K_STEP} (one mma.sp K step)"
            if fmt.dtype not in (torch.float16, torch.bfloat16):
                return f"dtype {fmt.dtype}: sparse tensor cores take float16/bfloat16"
            if fmt.device.type == "cuda":
                return ops.mma_sp_refusal(torch.cuda.get_device_capability(fmt.device),
                                          torch.cuda.get_device_name(fmt.device))
    return None


def sm90_reason(format_name: str, fmt: Any = None, device: torch.device | None = None) -> str | None:
    """Why our CUTLASS sm90a 2:4 kernel cannot take this weight (on ``device``), or None."""
    if format_name not in BACKEND_FORMATS["cuda:sm90"]:
        return f"the sm90 kernel runs 2:4 weights only, not format {format_name!r}"
    from sparse_prune.kernels import sm90

    if not sm90.has_sm90_extension():
        return f"the sm90 extension is not loaded ({sm90.sm90_extension_error()})"
    if device is not None and device.type == "cuda" and not sm90.has_sm90_device(device):
        name = torch.cuda.get_device_name(device) if torch.cuda.is_available() else "this machine's CUDA device"
        return f"{name} is not an sm_90 GPU (H100/H200)"
    if fmt is not None:
        if fmt.dtype not in (torch.float16, torch.bfloat16):
            return f"dtype {fmt.dtype}: the sm90 kernel takes float16/bfloat16"
        if fmt.shape[1] % sm90.K_MULTIPLE:
            return f"in_features = {fmt.shape[1]} is not a multiple of {sm90.K_MULTIPLE}"
    return None


def cusparselt_reason(format_name: str, fmt: Any = None) -> str | None:
    """Why torch's cuSPARSELt path cannot take this weight, or None."""
    if format_name not in BACKEND_FORMATS["cusparselt"]:
        return f"cuSPARSELt runs 2:4 weights only, not format {format_name!r}"
    if not torch.backends.cusparselt.is_available():
        return f"this torch ({torch.__version__}) has no cuSPARSELt"
    if fmt is not None:
        if fmt.dtype not in (torch.float16, torch.bfloat16):
            return f"dtype {fmt.dtype}: cuSPARSELt here takes float16/bfloat16"
        if any(side % CUSPARSELT_WEIGHT_MULTIPLE for side in fmt.shape):
            return (f"weight shape {tuple(fmt.shape)}: both sides must be multiples of "
                    f"{CUSPARSELT_WEIGHT_MULTIPLE} for cuSPARSELt")
    return None


def reason(format_name: str, backend: str, fmt: Any = None, device: torch.device | str | None = None) -> str | None:
    """Why ``backend`` cannot run ``format_name`` (``fmt`` when known) on ``device``, or None."""
    device = torch.device(device) if device is not None else (fmt.device if fmt is not None else torch.device("cpu"))
    if backend == "torch":
        return None
    if backend == "dense":
        return None
    if backend == "cuda":  # fit only: a CPU layer may ask for it and be moved to CUDA before running
        return cuda_reason(format_name, fmt)
    if backend == "triton":
        return triton_common.unavailable_reason() or triton_reason(format_name, fmt)
    if backend == "cusparselt":  # fit only, like "cuda": bound to a CUDA device before it runs
        return cusparselt_reason(format_name, fmt)
    if backend == "cuda:sm90":
        return sm90_reason(format_name, fmt, device)
    raise ValueError(f"unknown backend {backend!r}; allowed: {', '.join(BACKENDS)}")


def candidates(format_name: str, fmt: Any, device: torch.device | str) -> list[str]:
    """Backends that run ``fmt`` on ``device`` without rebuilding the weight per call, fastest
    first by design: CUDA: ``cuda``, ``triton`` where they fit; CPU: ``torch``."""
    device = torch.device(device)
    if format_name == "dense" or device.type != "cuda":
        return ["torch"]
    found = [b for b in ("cuda:sm90", "cuda", "triton", "cusparselt")
             if reason(format_name, b, fmt, device) is None]
    if format_name == "shrink":  # the reference multiplies the kept block only: no rebuild
        found.append("torch")
    return found


def runs_on(backend: str, device: torch.device | str) -> bool:
    """Whether an explicitly requested ``backend`` can run on ``device`` at all."""
    device = torch.device(device)
    if backend == "cuda":
        return device.type == "cuda" and ops.has_cuda_extension()
    if backend == "cusparselt":
        return device.type == "cuda" and torch.backends.cusparselt.is_available()
    if backend == "cuda:sm90":
        from sparse_prune.kernels import sm90

        return device.type == "cuda" and sm90.has_sm90_extension() and sm90.has_sm90_device(device)
    if backend == "triton":
        return triton_common.unavailable_reason() is None and (device.type == "cuda" or triton_common.interpreting())
    return True


def resolve_backend(backend: str, format_name: str, fmt: Any = None,
                    device: torch.device | str | None = None) -> str:
    """The backend a layer of ``format_name`` runs on, on ``device`` (default: ``fmt``'s, else
    the CPU). ``ValueError`` for an unknown backend, or ``triton``/``cuda`` where it cannot run
    or fit. The ``dense`` format always runs ``F.linear`` (backend ``torch``)."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; allowed: {', '.join(BACKENDS)}")
    device = torch.device(device) if device is not None else (fmt.device if fmt is not None else torch.device("cpu"))
    if format_name == "dense":
        return "torch"
    if backend == "auto":
        found = candidates(format_name, fmt, device)
        resolved = found[0] if found else "dense"
        if resolved == "torch" and device.type == "cuda" and format_name != "shrink":  # never a per-call rebuild
            resolved = "dense"
        backend = resolved
    elif backend in ("cuda", "cuda:sm90", "triton", "cusparselt"):
        why = reason(format_name, backend, fmt, device)
        if why is not None:
            raise ValueError(f"backend {backend!r} cannot run format {format_name!r} here: {why}")
    if backend == "triton":
        import sparse_prune.kernels.triton_ops  # noqa: F401  (registers the *_triton ops)
    return backend


# ---------------------------------------------------------------------------------------
# The kernels: (x [M, K], layer) -> y [M, N]. "torch" calls the op on the CPU (its CPU kernel
# is the reference) and the reference itself elsewhere (the explicit rebuild); "cuda" calls the
# op, whose CUDA kernel csrc/ registered; "triton" the Triton custom op; "dense" F.linear on
# the weight materialized once.


def _torch_path(op: str, x: torch.Tensor, *args):
    """The op on the CPU (its CPU kernel: ours from csrc/cpu/ where loaded, else the
    reference); the reference itself elsewhere (the explicit per-call rebuild of
    ``backend="torch"``)."""
    if x.device.type == "cpu":
        return getattr(torch.ops.sparse_prune, op)(x, *args)
    return getattr(reference, op)(x, *args)


def _dense(x, m):
    return torch.ops.sparse_prune.dense_linear(x, m.values, m.bias)


def _materialized(x, m):
    return F.linear(x, m.dense_weight, m.bias)


def _csr_torch(x, m):
    return _torch_path("csr_linear", x, m.values, m.crow_indices, m.col_indices, m.out_features, m.bias,
                       None, m.fused_activation)


def _need_cuda(x: torch.Tensor, backend: str = "cuda") -> None:
    if x.device.type != "cuda":
        raise ValueError(f"backend={backend!r} runs on CUDA tensors, got x on {x.device}: move the model with "
                         ".to('cuda'), or convert with backend='auto' (which follows the device)")


def _csr_cuda(x, m):
    _need_cuda(x)
    return torch.ops.sparse_prune.csr_linear(x, m.values, m.crow_indices, m.col_indices, m.out_features,
                                             m.bias, m.row_order)


def _csr_triton(x, m):
    return torch.ops.sparse_prune.csr_linear_triton(x, m.values, m.crow_indices, m.col_indices,
                                                    m.out_features, m.bias, m.row_order, m.fused_activation)


def _bsr_torch(x, m):
    return _torch_path("bsr_linear", x, m.values, m.crow_indices, m.col_indices, m.out_features, m.bias,
                       m.fused_activation)


def _bsr_triton(x, m):
    return torch.ops.sparse_prune.bsr_linear_triton(x, m.values, m.crow_indices, m.col_indices,
                                                    m.out_features, m.bias, m.fused_activation)


def _semi24_torch(x, m):
    return _torch_path("semi24_linear", x, m.values, m.meta, m.bias, m.fused_activation)


def _semi24_cuda(x, m):
    _need_cuda(x)
    return torch.ops.sparse_prune.semi24_linear(x, m.values, m.meta, m.bias)


def cusparselt_payload(fmt: Any) -> tuple[torch.Tensor, int]:
    """``(compressed weight, algorithm id)`` for cuSPARSELt, computed once when a layer is bound
    to a CUDA device: ``torch._cslt_compress`` of the masked weight, and the algorithm
    ``torch._cslt_sparse_mm_search`` finds fastest on :data:`CUSPARSELT_SEARCH_ROWS` random rows."""
    packed = torch._cslt_compress(fmt.to_dense().contiguous())
    probe = torch.randn(CUSPARSELT_SEARCH_ROWS, fmt.shape[1], device=fmt.device, dtype=fmt.dtype,
                        generator=torch.Generator(fmt.device).manual_seed(0))
    alg = torch._cslt_sparse_mm_search(packed, probe.t(), transpose_result=True)
    return packed, int(alg[0] if isinstance(alg, (tuple, list)) else alg)


def sm90_payload(fmt: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """``(a, e)`` for the sm90 kernel, once when a layer is bound to a Hopper GPU: the values as
    they are (padded to 8 rows) and the metadata repacked into CUTLASS's layout."""
    from sparse_prune.kernels import sm90

    return sm90.pack(fmt.values, fmt.meta, fmt.shape[1])


def _semi24_sm90(x, m):
    _need_cuda(x, "cuda:sm90")
    return torch.ops.sparse_prune.semi24_sm90_linear(x, m.sm90_a, m.sm90_e, m.out_features, m.bias,
                                                     1 if m.fused_activation else 0, -1)


def _semi24_cusparselt(x, m):
    _need_cuda(x, "cusparselt")
    rows = x.shape[0]
    pad = -rows % CUSPARSELT_ROW_MULTIPLE
    xp = F.pad(x, (0, 0, 0, pad)) if pad else x
    # A [N, K] sparse · B [K, M'] dense = Xᵀ view; transpose_result writes Y [M', N] directly
    y = torch._cslt_sparse_mm(m.cslt_packed, xp.t(), bias=m.bias, transpose_result=True, alg_id=m.cslt_alg)
    return y[:rows] if pad else y


def _semi24_triton(x, m):
    return torch.ops.sparse_prune.semi24_linear_triton(x, m.values, m.meta, m.bias, m.fused_activation)


def _shrunk_torch(x, m):
    return _torch_path("shrunk_linear", x, m.values, m.out_index, m.in_index, m.out_features, m.bias)


def _shrunk_triton(x, m):
    return torch.ops.sparse_prune.shrunk_linear_triton(x, m.values, m.out_index, m.in_index,
                                                       m.out_features, m.bias, m.fused_activation)


KERNELS: dict[tuple[str, str], Callable[[torch.Tensor, Any], torch.Tensor]] = {
    ("dense", "torch"): _dense,
    ("csr", "torch"): _csr_torch,
    ("csr", "cuda"): _csr_cuda,
    ("csr", "triton"): _csr_triton,
    ("csr", "dense"): _materialized,
    ("bsr", "torch"): _bsr_torch,
    ("bsr", "triton"): _bsr_triton,
    ("bsr", "dense"): _materialized,
    ("2:4", "torch"): _semi24_torch,
    ("2:4", "cuda"): _semi24_cuda,
    ("2:4", "triton"): _semi24_triton,
    ("2:4", "cusparselt"): _semi24_cusparselt,
    ("2:4", "cuda:sm90"): _semi24_sm90,
    ("2:4", "dense"): _materialized,
    ("shrink", "torch"): _shrunk_torch,
    ("shrink", "triton"): _shrunk_triton,
    ("shrink", "dense"): _materialized,
}

# Kernels that apply the exact GELU themselves (SparseLinear(activation="gelu") applies F.gelu
# after the others): in the epilogue for Triton, sm90 and our CPU kernels; the reference
# (``torch`` off the CPU, or without sparse_prune._C_cpu) applies F.gelu to its own output.
FUSED_GELU: frozenset[tuple[str, str]] = frozenset(
    {("csr", "triton"), ("bsr", "triton"), ("2:4", "triton"), ("shrink", "triton"), ("2:4", "cuda:sm90"),
     ("csr", "torch"), ("bsr", "torch"), ("2:4", "torch")})

# What each kernel really executes, for report(): name, and whether it skips pruned work.
_LABELS = {
    ("dense", "torch"): "F.linear",
    ("csr", "cuda"): "cuda:csr-spmm", ("csr", "triton"): "triton:csr",
    ("bsr", "triton"): "triton:bsr",
    ("2:4", "cuda"): "cuda:mma.sp", ("2:4", "cusparselt"): "cusparselt:_cslt_sparse_mm", ("2:4", "cuda:sm90"): "cuda:sm90",
    ("2:4", "triton"): "triton:2:4 (expanded, dense tl.dot)",
    ("shrink", "torch"): "torch:gather-gemm-scatter", ("shrink", "triton"): "triton:shrunk",
}


def kernel_label(format_name: str, backend: str, device: torch.device | str,
                 dtype: torch.dtype | None = None) -> str:
    """What runs, in words: e.g. ``cuda:mma.sp``, ``cpu:csr-avx512``, ``torch:rebuild+F.linear``,
    ``dense:F.linear``. Our CPU kernels run float64 on their portable path."""
    if backend == "dense":
        return "dense:F.linear (materialized)"
    if backend == "torch" and format_name in ("csr", "bsr", "2:4"):
        if cpu_kernel_runs(format_name, device):
            return f"cpu:{format_name}-{'portable' if dtype == torch.float64 else ops.cpu_isa()}"
        return "torch:rebuild+F.linear"
    return _LABELS[(format_name, backend)]


def flops_per_row(format_name: str, backend: str, fmt: Any) -> int:
    """Multiply-adds ×2 per input row that the kernel actually performs: dense ``2·N·K`` for
    every rebuild path (``torch`` CSR/BSR/2:4 off the CPU or without our CPU kernels), for
    ``dense`` and for the Triton 2:4 kernel (it expands to a dense ``tl.dot``); the stored work
    for kernels that skip the rest (our CPU kernels included: BSR counts whole blocks)."""
    n, k = fmt.shape
    dense = 2 * n * k
    if backend == "dense" or format_name == "dense":
        return dense
    if format_name == "shrink":
        return 2 * fmt.values.numel()
    if backend == "torch" and not cpu_kernel_runs(format_name, fmt.device):
        return dense
    if format_name == "csr":
        return 2 * fmt.nnz
    if format_name == "bsr":
        return 2 * fmt.values.numel()
    if format_name == "2:4":
        return n * k if backend in ("cuda", "cuda:sm90", "cusparselt", "torch") else dense
    return dense


def cpu_kernel_runs(format_name: str, device: torch.device | str) -> bool:
    """Whether ``backend="torch"`` runs our CPU kernel (csrc/cpu/) for ``format_name`` on
    ``device``, rather than the reference's dense rebuild."""
    return (torch.device(device).type == "cpu" and ops.has_cpu_extension()
            and ops.LINEAR_OPS.get(format_name) in ops.CPU_KERNEL_OPS)
