"""One rule for "this output matches the masked dense model", shared by the bench, the
per-kernel benchmark, ``format="auto"`` and the tests.

The rule (flash-attention's): measure the error against a high-precision reference (the
masked dense model run in float64, or float32 when float64 is not available), relative to the
reference's norm, and allow at most twice the error that the masked dense model of the *same
dtype* makes against that reference, plus a floor of one unit of the dtype's precision
(``torch.finfo(dtype).eps``). There is no flat absolute tolerance: an error that scales with
the output never hides under a constant.
"""

from __future__ import annotations

import math
from typing import Any

import torch

BASELINE_FACTOR = 2.0


class Mismatch(RuntimeError):
    """A converted output disagrees with the masked dense model beyond :func:`allowed_error`."""


def relative_error(got: torch.Tensor, reference: torch.Tensor) -> float:
    """``‖got − reference‖ / ‖reference‖`` (Frobenius, float64); ``inf`` for non-finite
    outputs or a shape mismatch; the absolute error when the reference is all zeros."""
    if got.shape != reference.shape:
        return math.inf
    diff = got.detach().to(torch.float64) - reference.detach().to(torch.float64)
    num = float(diff.norm())
    den = float(reference.detach().to(torch.float64).norm())
    if not math.isfinite(num):
        return math.inf
    return num / den if den > 0 else num


def floor(dtype: torch.dtype) -> float:
    """The smallest allowed relative error for outputs of ``dtype``: its machine epsilon."""
    if not dtype.is_floating_point:
        raise TypeError(f"dtype must be a floating point dtype, got {dtype}")
    return float(torch.finfo(dtype).eps)


def allowed_error(dtype: torch.dtype, baseline_error: float) -> float:
    """``2 × baseline_error + eps(dtype)``: the most a same-dtype kernel may err."""
    return BASELINE_FACTOR * baseline_error + floor(dtype)


def check_matches(got: torch.Tensor, reference: torch.Tensor, baseline: torch.Tensor,
                  what: str = "output") -> dict[str, Any]:
    """Check ``got`` (a converted model's or kernel's output) against ``reference`` (the masked
    dense model in float64/float32) with ``baseline`` (the masked dense model in ``got``'s
    dtype) setting the allowance.

    Returns ``{"error", "baseline_error", "allowed"}`` (relative errors). Raises
    :class:`Mismatch` naming ``what`` and all three figures when ``got`` errs more than
    :func:`allowed_error`, or is not finite.
    """
    error = relative_error(got, reference)
    baseline_error = relative_error(baseline, reference)
    if not math.isfinite(baseline_error):
        raise Mismatch(f"{what}: the masked dense baseline itself is not finite or has another shape")
    allowed = allowed_error(got.dtype, baseline_error)
    if not error <= allowed:  # also catches NaN
        raise Mismatch(f"{what}: relative error {error:.3g} vs the masked dense reference exceeds the "
                       f"allowed {allowed:.3g} (2 x the same-dtype dense error {baseline_error:.3g} + "
                       f"eps({str(got.dtype).removeprefix('torch.')}))")
    return {"error": error, "baseline_error": baseline_error, "allowed": allowed}


def reference_dtype(device: torch.device | str) -> torch.dtype:
    """float64 wherever it runs (CPU and CUDA); float32 on devices without it (e.g. MPS)."""
    return torch.float64 if torch.device(device).type in ("cpu", "cuda") else torch.float32
