"""What every Triton kernel of ours shares: availability, interpreter mode, input checks.

Triton is imported lazily by the kernel modules; ``available()`` says whether it can run here
(a CUDA device, or ``TRITON_INTERPRET=1`` on the CPU — set before Triton is first imported).
"""

from __future__ import annotations

import importlib.util
import os

import torch

FLOATS = (torch.float16, torch.bfloat16, torch.float32)
BSR_BLOCK_SIDES = (16, 32, 64)  # tl.dot needs every side >= 16


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
                        out_features: int) -> torch.Tensor:
    """Shared checks of ``Y = X·Wᵀ + b`` kernels; returns ``x`` made contiguous.

    Raises ``ValueError`` for wrong dims/dtypes/shapes and mixed devices, naming the argument.
    """
    if x.dim() != 2:
        raise ValueError(f"{op}: x must be 2-D [M, K], got shape {tuple(x.shape)}")
    if x.dtype not in FLOATS:
        raise ValueError(f"{op}: x dtype must be one of {FLOATS}, got {x.dtype}")
    if values.dtype != x.dtype:
        raise ValueError(f"{op}: values dtype {values.dtype} must equal x dtype {x.dtype}")
    devices = {t.device for t in (x, values, bias) if t is not None}
    if len(devices) > 1:
        raise ValueError(f"{op}: x, values and bias must be on one device, got {sorted(map(str, devices))}")
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
