"""One rule for "this output matches the masked dense model", shared by the bench, the
per-kernel benchmark, ``format="auto"`` and the tests.

The rule (flash-attention's): measure the error against a high-precision reference (the
masked dense model run in float64, or float32 when float64 is not available), relative to the
reference's norm, and allow at most twice the error that the masked dense model of the *same
dtype* makes against that reference, plus a floor of one unit of the dtype's precision
(``torch.finfo(dtype).eps``). There is no flat absolute tolerance: an error that scales with
the output never hides under a constant.

Non-finite inputs (one rule for every format and backend, and the check follows it):

* **lower bound** — an output that a kept (stored, nonzero) weight connects to a NaN/inf input
  is not finite: no kernel may lose a NaN or an inf (:func:`nonfinite_reach` gives the
  positions; ``check_matches(..., must_be_nonfinite=...)`` checks them);
* **upper bound** — an output computed from finite inputs only is finite (barring overflow:
  where the same-dtype masked dense model is finite, ``got`` must be finite too);
* **in between** — a NaN/inf meeting a pruned weight or a stored zero (dense arithmetic gives
  ``0·NaN = NaN``; a kernel that skips zeros gives a finite number): either is allowed. Such
  outputs are neither compared nor required finite; the error is measured over the outputs
  where the reference and the same-dtype baseline are both finite.
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


def nonfinite_reach(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``[M, N]`` bool: the outputs of ``x [M, K] · weightᵀ`` that a nonzero weight connects to
    a NaN/inf input — the ones the lower bound of the NaN rule requires to be non-finite."""
    bad = (~torch.isfinite(x)).reshape(-1, x.shape[-1]).to(torch.float32)
    return (bad @ (weight != 0).to(device=bad.device, dtype=torch.float32).T) > 0


def check_matches(got: torch.Tensor, reference: torch.Tensor, baseline: torch.Tensor,
                  what: str = "output", must_be_nonfinite: torch.Tensor | None = None) -> dict[str, Any]:
    """Check ``got`` (a converted model's or kernel's output) against ``reference`` (the masked
    dense model in float64/float32) with ``baseline`` (the masked dense model in ``got``'s
    dtype) setting the allowance, following the NaN rule of the module docstring: compared
    where ``reference`` and ``baseline`` are finite (``got`` must be finite there), and, when
    ``must_be_nonfinite`` (a bool mask of ``got``'s shape, e.g. :func:`nonfinite_reach`) is
    given, non-finite wherever it is set.

    Returns ``{"error", "baseline_error", "allowed"}`` (relative errors). Raises
    :class:`Mismatch` naming ``what`` and all three figures when ``got`` errs more than
    :func:`allowed_error`, or breaks either bound of the NaN rule.
    """
    if got.shape != reference.shape or baseline.shape != reference.shape:
        raise Mismatch(f"{what}: shape {tuple(got.shape)} (baseline {tuple(baseline.shape)}) but the reference "
                       f"has {tuple(reference.shape)}")
    finite = torch.isfinite(reference) & torch.isfinite(baseline).to(reference.device)
    got_finite = torch.isfinite(got).to(reference.device)
    lost = finite & ~got_finite
    if bool(lost.any()):
        raise Mismatch(f"{what}: {int(lost.sum())} output(s) not finite where the masked dense model is finite "
                       f"(first at {tuple(lost.nonzero()[0].tolist())}): finite inputs must give finite outputs")
    if must_be_nonfinite is not None:
        kept = must_be_nonfinite.to(reference.device) & got_finite
        if bool(kept.any()):
            raise Mismatch(f"{what}: {int(kept.sum())} output(s) finite although a kept weight meets a NaN/inf input "
                           f"(first at {tuple(kept.nonzero()[0].tolist())}): a NaN or inf was lost")
    if not bool(finite.all()):
        got, baseline, reference = got[finite.to(got.device)], baseline[finite.to(baseline.device)], reference[finite]
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
