"""Every custom op of sparse_prune: schema, fake kernel and per-device implementation.

One op per format (pytorch/extension-cpp's pattern): ``dense_linear``, ``csr_linear``,
``bsr_linear``, ``semi24_linear``, ``shrunk_linear`` compute ``Y [M, N] = X [M, K]·Wᵀ (+ bias)``
with W held in that format, plus ``compress_2to4``/``decompress_2to4``.

* **CPU**: our C++ kernels (csrc/cpu/, ``sparse_prune._C_cpu``: AVX-512 or AVX2+FMA where the
  CPU has them, a portable path elsewhere) for ``csr_linear``, ``bsr_linear`` and ``semi24_linear``; the
  pure-PyTorch reference (:mod:`sparse_prune.kernels.reference`) for the others, and for all
  of them when that library is not loaded (:func:`cpu_extension_error` says why).
* **CUDA**: our fastest kernel for the format — the csrc/ kernels (``TORCH_LIBRARY_IMPL(
  sparse_prune, CUDA)``: ``semi24_linear`` on sparse tensor cores — behind the checks of
  :func:`_semi24_mma_sp`: metadata validated once, aligned operands, compute capability —
  ``csr_linear``, ``compress_2to4``) when the compiled library is loaded, otherwise the Triton kernels
  registered below. There is **no** dense-rebuild fallback on CUDA: an input no kernel takes
  (e.g. 2:4 in float32 for ``mma.sp``) raises a clear error. The dense rebuild on a GPU exists
  only when asked for (``backend="torch"``, :mod:`sparse_prune.backends`).
* ``dense_linear`` is ``F.linear`` everywhere (cuBLAS on CUDA, MKL on the CPU).

Fake kernels (``register_fake``) live here too, including those of the Triton custom ops
(:mod:`sparse_prune.kernels.triton_ops`), so ``torch.compile`` and ``opcheck`` see one set.
Forcing a backend (bench, tests) goes through :mod:`sparse_prune.backends`' table, never by
op-name arithmetic.
"""

from __future__ import annotations

import importlib

import torch

from sparse_prune.checks import (
    aligned,
    check_2to4_meta_once,
    check_attention_operands,
    check_nm_mask,
    check_weight_and_mask,
)
from sparse_prune.constants import FLOAT_DTYPES
from sparse_prune.kernels import reference
from sparse_prune.kernels.fakes import linear_fake

_lib = torch.library.Library("sparse_prune", "DEF")  # noqa: TOR901 (long-lived on purpose)

_lib.define("compress_2to4(Tensor weight, Tensor mask) -> (Tensor values, Tensor meta)")
_lib.define("decompress_2to4(Tensor values, Tensor meta, int cols) -> Tensor")
# Pure data movement, vectorised: the reference serves every device; csrc/ overrides
# compress_2to4 on CUDA with its own kernel.
_lib.impl("compress_2to4", reference.compress_2to4, "CompositeExplicitAutograd")
_lib.impl("decompress_2to4", reference.decompress_2to4, "CompositeExplicitAutograd")

# Linear ops: Y [M, N] = X [M, K] · Wᵀ (+ bias), W in a format. Modules flatten leading dims.
LINEAR_OPS = {
    "dense": "dense_linear",
    "csr": "csr_linear",
    "bsr": "bsr_linear",
    "2:4": "semi24_linear",
    "shrink": "shrunk_linear",
}
_lib.define("dense_linear(Tensor x, Tensor weight, Tensor? bias) -> Tensor")
# row_order: the rows longest-first (formats.CSR.row_order), computed once by SparseLinear for
# the GPU kernels' load balance; None lets a kernel compute it (the reference ignores it).
# gelu: apply the exact (erf) GELU to the output, inside the kernel's epilogue where it has one
# (the CPU kernels of csrc/cpu/), after the product otherwise.
_lib.define("csr_linear(Tensor x, Tensor values, Tensor crow_indices, Tensor col_indices, "
            "int out_features, Tensor? bias, Tensor? row_order=None, bool gelu=False) -> Tensor")
_lib.define("bsr_linear(Tensor x, Tensor values, Tensor crow_indices, Tensor col_indices, "
            "int out_features, Tensor? bias, bool gelu=False) -> Tensor")
_lib.define("semi24_linear(Tensor x, Tensor values, Tensor meta, Tensor? bias, bool gelu=False) -> Tensor")
_lib.define("shrunk_linear(Tensor x, Tensor values, Tensor out_index, Tensor in_index, "
            "int out_features, Tensor? bias) -> Tensor")
# fc2(act(fc1(x))) of two sparse weights ("csr"/"bsr": values, crow_indices, col_indices; "2:4":
# values, meta), act the exact GELU when gelu: one op, so that our CPU kernel keeps the hidden
# layer in its transposed panel layout (no transpose out of fc1, none into fc2). Elsewhere it
# is the two linear ops in a row.
_lib.define("sparse_mlp(Tensor x, str format1, Tensor[] weight1, Tensor? bias1, int hidden, str format2, "
            "Tensor[] weight2, Tensor? bias2, int out_features, bool gelu=True) -> Tensor")
MLP_FORMATS = ("csr", "bsr", "2:4")


def _sparse_linear_call(x: torch.Tensor, format_name: str, weight: list[torch.Tensor], bias: torch.Tensor | None,
                        out_features: int, gelu: bool) -> torch.Tensor:
    """One layer of ``sparse_mlp`` through its per-format op."""
    if format_name not in MLP_FORMATS:
        raise ValueError(f"sparse_mlp formats must be one of {MLP_FORMATS}, got {format_name!r}")
    want = 2 if format_name == "2:4" else 3
    if len(weight) != want:
        raise ValueError(f"sparse_mlp: a {format_name!r} weight is {want} tensors, got {len(weight)}")
    if format_name == "csr":
        return torch.ops.sparse_prune.csr_linear(x, *weight, out_features, bias, None, gelu)
    if format_name == "bsr":
        return torch.ops.sparse_prune.bsr_linear(x, *weight, out_features, bias, gelu)
    return torch.ops.sparse_prune.semi24_linear(x, *weight, bias, gelu)


def _sparse_mlp_composite(x, format1, weight1, bias1, hidden, format2, weight2, bias2, out_features, gelu=True):
    """The two linear ops in a row (every device but the CPU with our kernels loaded)."""
    h = _sparse_linear_call(x, format1, list(weight1), bias1, hidden, gelu)
    return _sparse_linear_call(h, format2, list(weight2), bias2, out_features, False)


_lib.impl("sparse_mlp", _sparse_mlp_composite, "CompositeExplicitAutograd")

# softmax(scale · q·kᵀ)·v for q [B, H, Lq, D], k [B, H, Lk, D], v [B, H, Lk, Dv]: the output is
# [B, H, Lq, Dv] laid out as [B, Lq, H, Dv] (merging the heads next is a view). Our CPU kernel
# (csrc/cpu/attention_kernel.h) serves float32 on AVX-512 / AVX2+FMA CPUs; torch's SDPA everywhere else.
_lib.define("attention(Tensor q, Tensor k, Tensor v, float? scale=None) -> Tensor")


def _attention_composite(q, k, v, scale=None):
    check_attention_operands(q, k, v, scale)
    return reference.attention(q, k, v, scale)


_lib.impl("attention", _attention_composite, "CompositeExplicitAutograd")


def _attention_setup_context(ctx, inputs, output):
    q, k, v, scale = inputs
    ctx.save_for_backward(q, k, v)
    ctx.scale = scale


def _attention_backward(ctx, grad):
    """Gradients through torch's SDPA, recomputed (the kernel keeps no softmax statistics)."""
    q, k, v = (t.detach().requires_grad_(t.requires_grad) for t in ctx.saved_tensors)
    wanted = [t for t in (q, k, v) if t.requires_grad]
    with torch.enable_grad():
        out = torch.nn.functional.scaled_dot_product_attention(q, k, v, scale=ctx.scale)
        got = iter(torch.autograd.grad(out, wanted, grad))
    return tuple(next(got) if t.requires_grad else None for t in (q, k, v)) + (None,)


torch.library.register_autograd("sparse_prune::attention", _attention_backward,
                                setup_context=_attention_setup_context)

# Private: the csrc/ mma.sp kernel itself (CUDA only). semi24_linear's CUDA implementation
# (_semi24_mma_sp below) runs the checks of semi24_cuda_operands, then calls it.
_lib.define("semi24_linear_mma_sp(Tensor x, Tensor values, Tensor meta, Tensor? bias, bool gelu=False) -> Tensor")


def _reference_impl(name: str):
    """The CPU kernel of op ``name``: ``reference.<name>``, looked up at call time so the kernel
    tests can make the reference raise (a kernel silently swapped for it then fails)."""
    def run(x, *args):
        return getattr(reference, name)(x, *args)
    return run


# Ops whose CPU kernel is ours (csrc/cpu/, sparse_prune._C_cpu) when that library is loaded.
CPU_KERNEL_OPS = ("csr_linear", "bsr_linear", "semi24_linear", "sparse_mlp")

_CPU_EXTENSION_ERROR: str | None = "not loaded yet"
# The op-schema version csrc/cpu/cpu_ops.cpp must be built for (SPARSE_PRUNE_CPU_ABI there).
CPU_EXTENSION_ABI = 3


def _load_kernels(module: str, abi: int) -> str | None:
    """Import a compiled kernel library, check it was built for these schemas (``abi``), then
    let it register its kernels. Returns why it is not loaded (None when it is); never raises,
    so ``import sparse_prune`` never fails."""
    try:
        lib = importlib.import_module(module)
        built_for = lib.abi_version()
        if built_for != abi:
            raise ImportError(f"{module} was built for op schemas v{built_for}, this sparse_prune has "
                              f"v{abi}: rebuild it (pip install --no-build-isolation -e .)")
        lib.register_kernels()
    except (ImportError, AttributeError, OSError) as exc:  # not built, another torch, stale, a missing .so
        return f"{type(exc).__name__}: {exc}"
    except RuntimeError as exc:  # registration refused (signature mismatch)
        return f"{type(exc).__name__}: kernels not registered: {exc}"
    return None


def _load_cpu_extension(module: str = "sparse_prune._C_cpu") -> None:
    """Load our CPU kernels; a failure is recorded in :func:`cpu_extension_error` and the
    reference serves instead."""
    global _CPU_EXTENSION_ERROR
    _CPU_EXTENSION_ERROR = _load_kernels(module, CPU_EXTENSION_ABI)


def has_cpu_extension() -> bool:
    """True when our CPU kernels (``sparse_prune._C_cpu``) serve csr/bsr/2:4 on the CPU."""
    return _CPU_EXTENSION_ERROR is None


def cpu_extension_error() -> str | None:
    """Why the CPU kernels are not loaded (``None`` when they are)."""
    return _CPU_EXTENSION_ERROR


def cpu_isa() -> str | None:
    """What our CPU kernels run float32 on now: the widest of ``"avx512"`` (AVX-512F), ``"avx2"``
    (AVX2+FMA) and ``"portable"`` this CPU has (checked at run time), or the one
    ``SPARSE_PRUNE_CPU_ISA`` names; None when the CPU kernels are not loaded. float64 always runs
    the portable path."""
    if not has_cpu_extension():
        return None
    return importlib.import_module("sparse_prune._C_cpu").isa()


_BUILD_FINGERPRINTS: dict[tuple[str, int, int], str] = {}


def kernel_builds() -> str:
    """Fingerprints of our compiled kernel libraries loaded now (``_C_cpu``, ``_C``,
    ``_C_sm90``: the first 12 hex digits of each file's SHA-256), e.g. ``"_C_cpu:1f2e3d4c5b6a"``;
    ``""`` when none is loaded. Part of ``format="auto"``'s cache key, so that timings measured
    with another build of the kernels are measured again, never reused."""
    import hashlib
    import os
    import sys

    out = []
    for name in ("_C_cpu", "_C", "_C_sm90"):
        if name == "_C_cpu" and not has_cpu_extension():  # imported but refused (ABI): not serving
            continue
        path = getattr(sys.modules.get(f"sparse_prune.{name}"), "__file__", None)
        if not path:
            continue
        try:
            st = os.stat(path)
            key = (path, st.st_size, st.st_mtime_ns)
            if key not in _BUILD_FINGERPRINTS:
                digest = hashlib.sha256()
                with open(path, "rb") as f:  # in chunks: hashlib.file_digest is Python >= 3.11
                    for chunk in iter(lambda: f.read(1 << 20), b""):
                        digest.update(chunk)
                _BUILD_FINGERPRINTS[key] = digest.hexdigest()[:12]
            out.append(f"{name}:{_BUILD_FINGERPRINTS[key]}")
        except OSError:  # unreadable: a key no other build shares, so nothing cached is reused
            out.append(f"{name}:unreadable")
    return ",".join(out)


def clear_cpu_cache() -> None:
    """Drop the CPU kernels' cached csr segment layouts (built once per float32 csr weight and
    reused while its tensors are unchanged, judged by their version counters). Call it after
    changing a weight in a way the version counter does not see: through ``.data``, a NumPy
    view or a raw pointer. A no-op when the CPU kernels are not loaded."""
    if has_cpu_extension():
        importlib.import_module("sparse_prune._C_cpu").clear_segment_cache()


def cpu_isas() -> list[str]:
    """Every ISA our CPU kernels can run float32 on here, widest first (``"avx512"``, ``"avx2"``,
    ``"portable"``); empty when the CPU kernels are not loaded."""
    if not has_cpu_extension():
        return []
    return list(importlib.import_module("sparse_prune._C_cpu").isas())


_load_cpu_extension()
for _name in LINEAR_OPS.values():
    if not (has_cpu_extension() and _name in CPU_KERNEL_OPS):
        _lib.impl(_name, _reference_impl(_name), "CPU")
_lib.impl("dense_linear", reference.dense_linear, "CUDA")  # F.linear: cuBLAS


# ---------------------------------------------------------------------------------------
# Fake kernels: one shape rule for every linear op, ours and the Triton custom ops.


@torch.library.register_fake("sparse_prune::compress_2to4")
def _compress_2to4_fake(weight: torch.Tensor, mask: torch.Tensor):
    torch._check(weight.dim() == 2, lambda: f"weight must be 2-D, got {weight.dim()}-D")
    torch._check(mask.shape == weight.shape, lambda: "mask must have the weight's shape")
    rows, cols = weight.shape
    torch._check(cols % 4 == 0, lambda: f"K must be a multiple of 4, got {cols}")
    values = weight.new_empty((rows, cols // 2))
    meta = weight.new_empty((rows, (cols + 15) // 16), dtype=torch.int16)
    return values, meta


@torch.library.register_fake("sparse_prune::decompress_2to4")
def _decompress_2to4_fake(values: torch.Tensor, meta: torch.Tensor, cols: int):
    torch._check(values.dim() == 2 and meta.dim() == 2, lambda: "values and meta must be 2-D")
    torch._check(values.shape[1] * 2 == cols, lambda: "values must hold K/2 columns")
    return values.new_empty((values.shape[0], cols))


torch.library.register_fake("sparse_prune::dense_linear")(
    lambda x, weight, bias: linear_fake(x, weight.shape[0]))
torch.library.register_fake("sparse_prune::csr_linear")(
    lambda x, values, crow, col, out_features, bias, row_order=None, gelu=False: linear_fake(x, out_features))
torch.library.register_fake("sparse_prune::bsr_linear")(
    lambda x, values, crow, col, out_features, bias, gelu=False: linear_fake(x, out_features))
torch.library.register_fake("sparse_prune::semi24_linear")(
    lambda x, values, meta, bias, gelu=False: linear_fake(x, values.shape[0]))
torch.library.register_fake("sparse_prune::semi24_linear_mma_sp")(
    lambda x, values, meta, bias, gelu=False: linear_fake(x, values.shape[0]))
torch.library.register_fake("sparse_prune::shrunk_linear")(
    lambda x, values, out_index, in_index, out_features, bias: linear_fake(x, out_features))
@torch.library.register_fake("sparse_prune::attention")
def _attention_fake(q, k, v, scale=None):
    check_attention_operands(q, k, v, scale)
    b, h, lq, _ = q.shape
    return q.new_empty((b, lq, h, v.shape[3])).transpose(1, 2)


torch.library.register_fake("sparse_prune::sparse_mlp")(
    lambda x, format1, weight1, bias1, hidden, format2, weight2, bias2, out_features, gelu=True:
    linear_fake(x, out_features))


# ---------------------------------------------------------------------------------------
# Public wrappers: argument checks with clear errors, then the op.


def compress_2to4(
    weight: torch.Tensor, mask: torch.Tensor | None = None, *, backend: str = "auto"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Compress a 2:4-sparse weight ``[N, K]`` into ``(values [N, K/2], meta int16 [N, ceil(K/16)])``.

    ``mask`` (bool, same shape) says which weights are kept; without it the nonzeros of
    ``weight`` are (−0.0 counts as zero). The layout is documented in
    ``docs/semi_structured_layout.md``. ``backend``: "auto" (the op: CUDA kernel for CUDA
    tensors when compiled, else the reference), "torch" (the reference), "cuda" (the compiled
    kernel; error when absent).

    Raises ``TypeError`` for non-tensors or wrong dtypes and ``ValueError`` for wrong shapes,
    mixed devices, K not a multiple of 4, or a mask that is not 2:4 (naming the first bad group).
    """
    allowed = ("auto", "torch", "cuda")
    if backend not in allowed:
        raise ValueError(f"backend must be one of {allowed}, got {backend!r}")
    mask = check_weight_and_mask(weight, mask, FLOAT_DTYPES)
    if weight.shape[1] % 4:
        raise ValueError(f"weight.shape[1] (K = {weight.shape[1]}) must be a multiple of 4 for 2:4")
    check_nm_mask(mask, 2, 4)
    if backend == "torch":
        return reference.compress_2to4(weight, mask)
    if backend == "cuda":
        if not has_cuda_extension():
            raise ValueError(f"backend='cuda' needs the compiled extension: {extension_error()}")
        if weight.device.type != "cuda":
            raise ValueError(f"backend='cuda' needs CUDA tensors, got {weight.device}")
    return torch.ops.sparse_prune.compress_2to4(weight, mask)


def decompress_2to4(values: torch.Tensor, meta: torch.Tensor, cols: int) -> torch.Tensor:
    """Dense ``[N, cols]`` weight from the output of :func:`compress_2to4`."""
    if values.dim() != 2 or meta.dim() != 2 or values.shape[0] != meta.shape[0]:
        raise ValueError("values and meta must be 2-D with the same number of rows")
    if meta.dtype != torch.int16:
        raise TypeError(f"meta must be torch.int16, got {meta.dtype}")
    if cols % 4 or values.shape[1] * 2 != cols or meta.shape[1] != (cols + 15) // 16:
        raise ValueError(
            f"cols={cols} does not fit values {tuple(values.shape)} and meta {tuple(meta.shape)}"
        )
    return torch.ops.sparse_prune.decompress_2to4(values, meta, cols)


# ---------------------------------------------------------------------------------------
# The compiled library (csrc/). Loading it must never make `import sparse_prune` fail.

_EXTENSION_ERROR: str | None = "not loaded yet"
# The op-schema version csrc/register_ops.cpp must be built for (SPARSE_PRUNE_ABI there).
EXTENSION_ABI = 4


def _load_extension(module: str = "sparse_prune._C") -> None:
    """Load the CUDA kernels; a failure is recorded in :func:`extension_error`, never raised."""
    global _EXTENSION_ERROR
    _EXTENSION_ERROR = _load_kernels(module, EXTENSION_ABI)


def has_cuda_extension() -> bool:
    """True when the compiled CUDA kernels (``sparse_prune._C``) are loaded."""
    return _EXTENSION_ERROR is None


def extension_error() -> str | None:
    """Why the compiled extension is not loaded (``None`` when it is)."""
    return _EXTENSION_ERROR


def has_cuda_kernel(op: str) -> bool:
    """Whether ``sparse_prune::<op>`` has a kernel registered for CUDA tensors."""
    return torch._C._dispatch_has_kernel_for_dispatch_key(f"sparse_prune::{op}", "CUDA")


_load_extension()


# ---------------------------------------------------------------------------------------
# CUDA kernels for the ops csrc/ did not register: the Triton kernels (imported on first
# call, so importing sparse_prune never needs Triton). No reference fallback: see above.


def _triton_cuda(format_name: str):
    def run(x: torch.Tensor, *args):
        from sparse_prune.kernels import triton_common

        reason = triton_common.unavailable_reason()
        if reason is not None:
            raise ValueError(f"sparse_prune::{LINEAR_OPS[format_name]} on CUDA runs the Triton kernel, which "
                             f"cannot run here: {reason}; convert with backend='torch' to rebuild the "
                             "weight densely instead")
        from sparse_prune.kernels import triton_ops

        return triton_ops.KERNELS[format_name](x, *args)
    return run


# ---------------------------------------------------------------------------------------
# semi24_linear on CUDA: the csrc/ mma.sp kernel behind the checks it cannot make cheaply.

MMA_SP_OP = "semi24_linear (CUDA, mma.sp)"
MMA_SP_MIN_CAPABILITY = (8, 0)
MMA_SP_ALIGNMENT = 4  # bytes: the kernel loads x and values 32 bits at a time


def mma_sp_refusal(capability: tuple[int, int], name: str = "this GPU") -> str | None:
    """Why the mma.sp kernel cannot run on a device of ``capability`` (None: it can)."""
    if tuple(capability) < MMA_SP_MIN_CAPABILITY:
        return (f"{name} is compute capability {capability[0]}.{capability[1]}; the 2:4 CUDA kernel needs "
                f"{MMA_SP_MIN_CAPABILITY[0]}.{MMA_SP_MIN_CAPABILITY[1]} or newer (sparse tensor cores, mma.sp): "
                "use backend='triton'")
    return None


def semi24_cuda_operands(x: torch.Tensor, values: torch.Tensor,
                         meta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """What ``semi24_linear`` checks before the mma.sp kernel sees its operands (any device, so
    the CPU tests run it): ``meta`` validated once per tensor
    (:func:`~sparse_prune.checks.check_2to4_meta_once`: ``ValueError`` naming the bad group),
    and ``x``/``values`` returned contiguous and 4-byte aligned — a view at an odd storage
    offset (``x[1:]`` of float16) is copied once into aligned storage instead of faulting on
    the kernel's 32-bit loads. Shapes and dtypes are the kernel's own checks."""
    if not isinstance(x, torch.Tensor) or x.dim() != 2:
        raise ValueError(f"{MMA_SP_OP}: x must be a 2-D tensor [M, K]")
    check_2to4_meta_once(meta, x.shape[1], name=f"{MMA_SP_OP}: meta")
    return aligned(x, MMA_SP_ALIGNMENT), aligned(values, MMA_SP_ALIGNMENT)


_CAPABILITY: dict[int, tuple[int, int]] = {}


def _semi24_mma_sp(x, values, meta, bias, gelu=False):
    """semi24_linear's CUDA kernel: refuses compute capability < 8.0 (``ValueError``), runs
    :func:`semi24_cuda_operands`, then the mma.sp kernel. A few µs of Python per call: the
    capability is cached per device and a layer's metadata is validated once, not per call."""
    index = x.device.index if x.device.index is not None else torch.cuda.current_device()
    if index not in _CAPABILITY:
        _CAPABILITY[index] = torch.cuda.get_device_capability(index)
    if _CAPABILITY[index] < MMA_SP_MIN_CAPABILITY:
        raise ValueError(f"{MMA_SP_OP}: {mma_sp_refusal(_CAPABILITY[index], torch.cuda.get_device_name(index))}")
    x, values = semi24_cuda_operands(x, values, meta)
    return torch.ops.sparse_prune.semi24_linear_mma_sp(x, values, meta, bias, gelu)


if has_cuda_kernel("semi24_linear_mma_sp"):
    _lib.impl("semi24_linear", _semi24_mma_sp, "CUDA")

for _fmt, _name in LINEAR_OPS.items():
    if _fmt != "dense" and not has_cuda_kernel(_name):
        _lib.impl(_name, _triton_cuda(_fmt), "CUDA")


# The Hopper 2:4 ops (schemas, fakes, CPU refusals and the ABI-checked loader of
# sparse_prune._C_sm90) live beside their layout math in kernels/sm90.py; importing it here
# keeps every sparse_prune op defined once `sparse_prune.ops` is imported.
from sparse_prune.kernels import sm90  # noqa: E402,F401
