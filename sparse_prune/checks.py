"""Argument checks shared by formats, ops and kernels: clear errors naming the argument."""

from __future__ import annotations

import torch


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


def check_same_device(op: str, **tensors: torch.Tensor | None) -> torch.device:
    """Raise ``ValueError`` naming every argument when the given tensors (``None`` skipped)
    are not all on one device; return that device."""
    given = {name: t for name, t in tensors.items() if t is not None}
    devices = {t.device for t in given.values()}
    if len(devices) > 1:
        where = ", ".join(f"{name} on {t.device}" for name, t in given.items())
        raise ValueError(f"{op}: all tensors must be on one device, got {where}")
    return next(iter(devices)) if devices else torch.device("cpu")
