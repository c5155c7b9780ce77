"""What every Triton kernel of ours shares: availability, interpreter mode, input checks.

Triton is imported lazily by the kernel modules; ``available()`` says whether it can run here
(a CUDA device, or ``TRITON_INTERPRET=1`` on the CPU — set before Triton is first imported).
"""

from __future__ import annotations

import importlib.util
import os

import torch

from sparse_prune.checks import check_same_device
from sparse_prune.constants import BSR_BLOCK_SIDES, FLOAT_DTYPES

FLOATS = FLOAT_DTYPES
__all__ = ["BSR_BLOCK_SIDES", "FLOATS", "available", "check_linear_inputs", "configs", "dot_precision",
           "interpreting", "unavailable_reason"]


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def available() -> bool:
    """Triton importable and something to run it on (a CUDA device or the interpreter)."""
    return importlib.util.find_spec("triton") is not None and (torch.cuda.is_available() or interpreting())


def unavailable_reason() -> str | None:
    if importlib.util.find_spec("triton") is None:
        return "triton is not installed"
    if not (torch.cuda.is_available() or interpreting()):
        return "no CUDA device (set TRITON_INTERPRET=1 before importing triton to run kernels on the CPU)"
    return None


def check_linear_inputs(op: str, x: torch.Tensor, values: torch.Tensor, bias: torch.Tensor | None,
                        out_features: int, **indices: torch.Tensor | None) -> torch.Tensor:
    """Shared checks of ``Y = X·Wᵀ + b`` kernels; returns ``x`` made contiguous.

    ``indices`` are the format's other tensors (crow_indices, meta, ...), checked to be on
    ``x``'s device too. Raises ``ValueError`` for wrong dims/dtypes/shapes and mixed devices,
    naming the argument.
    """
    if x.dim() != 2:
        raise ValueError(f"{op}: x must be 2-D [M, K], got shape {tuple(x.shape)}")
    if x.dtype not in FLOATS:
        raise ValueError(f"{op}: x dtype must be one of {FLOATS}, got {x.dtype}")
    if values.dtype != x.dtype:
        raise ValueError(f"{op}: values dtype {values.dtype} must equal x dtype {x.dtype}")
    check_same_device(op, x=x, values=values, bias=bias, **indices)
    if x.device.type == "cpu" and not interpreting():
        raise ValueError(f"{op}: Triton kernels need CUDA tensors (or TRITON_INTERPRET=1 on the CPU)")
    if bias is not None and (bias.dtype != x.dtype or tuple(bias.shape) != (out_features,)):
        raise ValueError(f"{op}: bias must be [{out_features}] of dtype {x.dtype}, "
                         f"got {tuple(bias.shape)} {bias.dtype}")
    return x.contiguous()


def dot_precision(dtype: torch.dtype) -> str:
    """fp32 inputs multiply in full precision, as F.linear does with TF32 off (torch's default)."""
    return "ieee" if dtype == torch.float32 else "tf32"


def configs(full: list, interpreter: list) -> list:
    """Autotune configs: the interpreter runs each candidate on numpy, so it gets one; so do
    GPU test runs with ``SPARSE_PRUNE_TUNE=0`` (read at import; they check results, not speed)."""
    return interpreter if interpreting() or os.environ.get("SPARSE_PRUNE_TUNE") == "0" else full
