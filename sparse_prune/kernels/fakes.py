"""The shape rule every linear op's fake kernel shares (ours in :mod:`sparse_prune.ops`, the
Triton custom ops in :mod:`sparse_prune.kernels.triton_ops`). A module of its own, so those two
import it without importing each other."""

from __future__ import annotations

import torch


def linear_fake(x: torch.Tensor, out_features: int) -> torch.Tensor:
    """The output of any linear op: ``[M, out_features]`` like ``x [M, K]``."""
    torch._check(x.dim() == 2, lambda: f"x must be 2-D [M, K], got {x.dim()}-D")
    return x.new_empty((x.shape[0], out_features))
