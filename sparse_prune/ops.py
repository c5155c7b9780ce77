"""Every custom op of sparse_prune: schema, fake kernel, reference and dispatch.

Schemas are defined here with ``torch.library``; the reference in
``sparse_prune.kernels.reference`` is registered as the ``CompositeExplicitAutograd`` kernel
(it runs on any device), and ``csrc/`` registers faster CUDA kernels for the same schemas
with ``TORCH_LIBRARY_IMPL(sparse_prune, CUDA, ...)``, which take precedence on CUDA tensors.
The compiled library is loaded at the bottom of this module, after the schemas exist.
"""

from __future__ import annotations

import importlib

import torch

from sparse_prune.kernels import reference

_lib = torch.library.Library("sparse_prune", "DEF")  # noqa: TOR901 (long-lived on purpose)

_lib.define("compress_2to4(Tensor weight, Tensor mask) -> (Tensor values, Tensor meta)")
_lib.define("decompress_2to4(Tensor values, Tensor meta, int cols) -> Tensor")

_lib.impl("compress_2to4", reference.compress_2to4, "CompositeExplicitAutograd")
_lib.impl("decompress_2to4", reference.decompress_2to4, "CompositeExplicitAutograd")


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


# Linear ops: Y [M, N] = X [M, K] · Wᵀ (+ bias), W in a format. Modules flatten leading dims.
_lib.define("dense_linear(Tensor x, Tensor weight, Tensor? bias) -> Tensor")
_lib.define("csr_linear(Tensor x, Tensor values, Tensor crow_indices, Tensor col_indices, "
            "int out_features, Tensor? bias) -> Tensor")
_lib.define("bsr_linear(Tensor x, Tensor values, Tensor crow_indices, Tensor col_indices, "
            "int out_features, Tensor? bias) -> Tensor")
_lib.define("semi24_linear(Tensor x, Tensor values, Tensor meta, Tensor? bias) -> Tensor")
_lib.define("shrunk_linear(Tensor x, Tensor values, Tensor out_index, Tensor in_index, "
            "int out_features, Tensor? bias) -> Tensor")
for _name in ("dense_linear", "csr_linear", "bsr_linear", "semi24_linear", "shrunk_linear"):
    _lib.impl(_name, getattr(reference, _name), "CompositeExplicitAutograd")


# CUDA-only kernels of csrc/ (backend="cuda"): no reference registered, so calling them on a
# CPU tensor fails loudly instead of silently running something else.
_lib.define("semi24_linear_cuda(Tensor x, Tensor values, Tensor meta, Tensor? bias) -> Tensor")
_lib.define("csr_linear_cuda(Tensor x, Tensor values, Tensor crow_indices, Tensor col_indices, "
            "Tensor row_order, int out_features, Tensor? bias) -> Tensor")


def _cuda_only(name: str):
    def refuse(x: torch.Tensor, *args, **kwargs):
        raise ValueError(f"sparse_prune::{name} (backend='cuda') runs on CUDA tensors, got x on {x.device}; "
                         "move the model with .to('cuda') or convert with backend='torch'")
    return refuse


for _name in ("semi24_linear_cuda", "csr_linear_cuda"):
    _lib.impl(_name, _cuda_only(_name), "CPU")


def _linear_fake(x: torch.Tensor, out_features: int) -> torch.Tensor:
    torch._check(x.dim() == 2, lambda: f"x must be 2-D [M, K], got {x.dim()}-D")
    return x.new_empty((x.shape[0], out_features))


torch.library.register_fake("sparse_prune::dense_linear")(
    lambda x, weight, bias: _linear_fake(x, weight.shape[0]))
torch.library.register_fake("sparse_prune::csr_linear")(
    lambda x, values, crow, col, out_features, bias: _linear_fake(x, out_features))
torch.library.register_fake("sparse_prune::bsr_linear")(
    lambda x, values, crow, col, out_features, bias: _linear_fake(x, out_features))
torch.library.register_fake("sparse_prune::semi24_linear")(
    lambda x, values, meta, bias: _linear_fake(x, values.shape[0]))
torch.library.register_fake("sparse_prune::shrunk_linear")(
    lambda x, values, out_index, in_index, out_features, bias: _linear_fake(x, out_features))
torch.library.register_fake("sparse_prune::semi24_linear_cuda")(
    lambda x, values, meta, bias: _linear_fake(x, values.shape[0]))
torch.library.register_fake("sparse_prune::csr_linear_cuda")(
    lambda x, values, crow, col, row_order, out_features, bias: _linear_fake(x, out_features))


# ---------------------------------------------------------------------------------------
# Public wrappers: argument checks with clear errors, then the op.

BACKENDS = ("auto", "torch", "cuda")
_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def check_nm_mask(mask: torch.Tensor, n: int = 2, m: int = 4, *, name: str = "mask") -> None:
    """Raise ``ValueError`` naming the first group of ``m`` columns keeping more than ``n``."""
    if mask.shape[-1] % m:
        raise ValueError(f"{name}: the last dimension ({mask.shape[-1]}) must be a multiple of {m}")
    counts = mask.reshape(-1, mask.shape[-1] // m, m).sum(-1)
    bad = (counts > n).nonzero()
    if bad.numel():
        row, group = (int(v) for v in bad[0])
        raise ValueError(
            f"{name} is not {n}:{m}: row {row}, columns {group * m}..{group * m + m - 1} keep "
            f"{int(counts[row, group])} of {m} (at most {n} allowed)"
        )


def check_weight_and_mask(weight: torch.Tensor, mask: torch.Tensor | None,
                          dtypes: tuple[torch.dtype, ...]) -> torch.Tensor:
    """Check a 2-D weight of one of ``dtypes`` and its bool mask; return the mask.

    Without ``mask``, the nonzeros of ``weight`` are kept. ``TypeError`` for non-tensors and
    wrong dtypes, ``ValueError`` for wrong dims, shapes and mixed devices.
    """
    if not isinstance(weight, torch.Tensor):
        raise TypeError(f"weight must be a torch.Tensor, got {type(weight).__name__}")
    if weight.dim() != 2:
        raise ValueError(f"weight must be 2-D [N, K], got shape {tuple(weight.shape)}")
    if weight.dtype not in dtypes:
        raise TypeError(f"weight dtype must be one of {dtypes}, got {weight.dtype}")
    if mask is None:
        return weight != 0
    if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
        raise TypeError("mask must be a torch.bool tensor")
    if mask.shape != weight.shape:
        raise ValueError(f"mask shape {tuple(mask.shape)} must equal weight shape {tuple(weight.shape)}")
    if mask.device != weight.device:
        raise ValueError(f"mask is on {mask.device} but weight is on {weight.device}")
    return mask


def compress_2to4(
    weight: torch.Tensor, mask: torch.Tensor | None = None, *, backend: str = "auto"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Compress a 2:4-sparse weight ``[N, K]`` into ``(values [N, K/2], meta int16 [N, ceil(K/16)])``.

    ``mask`` (bool, same shape) says which weights are kept; without it the nonzeros of
    ``weight`` are. The layout is documented in ``docs/semi_structured_layout.md``.
    ``backend``: "auto" (CUDA kernel for CUDA tensors when compiled, else the reference),
    "torch" (the reference), "cuda" (the compiled kernel; error when absent).

    Raises ``TypeError`` for non-tensors or wrong dtypes and ``ValueError`` for wrong shapes,
    mixed devices, K not a multiple of 4, or a mask that is not 2:4 (naming the first bad group).
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    mask = check_weight_and_mask(weight, mask, _FLOAT_DTYPES)
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


def _load_extension() -> None:
    global _EXTENSION_ERROR
    try:
        importlib.import_module("sparse_prune._C")
    except ImportError as exc:  # not built (no toolkit, CPU torch) or built for another torch
        _EXTENSION_ERROR = f"{type(exc).__name__}: {exc}"
    except OSError as exc:  # a shared library it links against is missing
        _EXTENSION_ERROR = f"{type(exc).__name__}: {exc}"
    else:
        _EXTENSION_ERROR = None


def has_cuda_extension() -> bool:
    """True when the compiled CUDA kernels (``sparse_prune._C``) are loaded."""
    return _EXTENSION_ERROR is None


def extension_error() -> str | None:
    """Why the compiled extension is not loaded (``None`` when it is)."""
    return _EXTENSION_ERROR


_load_extension()
