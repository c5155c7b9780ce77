"""Argument checks shared by formats, ops and kernels: clear errors naming the argument."""

from __future__ import annotations

import math

import torch
import torch.utils.weak


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


# ---------------------------------------------------------------------------------------
# 2:4 metadata: checked once per tensor before any kernel reads it.

# Bit n set <=> nibble n holds two increasing column indices (bits [1:0] first, [3:2] second;
# docs/semi_structured_layout.md): (0,1)=4, (0,2)=8, (0,3)=12, (1,2)=9, (1,3)=13, (2,3)=14.
# Anything else (0000, 0101, 1010, 1111, a decreasing pair) is undefined behaviour for
# mma.sp::ordered_metadata and wrong for every other kernel.
VALID_2TO4_NIBBLES = (1 << 4) | (1 << 8) | (1 << 12) | (1 << 9) | (1 << 13) | (1 << 14)

_VALIDATED_META = torch.utils.weak.WeakIdKeyDictionary()  # tensor -> its _version when validated


def check_2to4_meta(meta: torch.Tensor, cols: int, *, name: str = "meta") -> None:
    """Raise ``ValueError`` (naming ``name``, the first bad row and columns) unless ``meta`` is
    int16 ``[N, ceil(cols/16)]`` whose every used nibble holds two increasing column indices;
    the unused nibbles of a partial last word are ignored. Vectorised (one pass, one host sync
    on a GPU). Records ``meta`` as validated (see :func:`check_2to4_meta_once`)."""
    if not isinstance(meta, torch.Tensor) or meta.dtype != torch.int16 or meta.dim() != 2:
        raise ValueError(f"{name} must be a 2-D torch.int16 tensor, got "
                         f"{meta.dtype if isinstance(meta, torch.Tensor) else type(meta).__name__}")
    if cols % 4 or meta.shape[1] != (cols + 15) // 16:
        raise ValueError(f"{name} must be [N, {(cols + 15) // 16}] for K = {cols} (a multiple of 4), "
                         f"got {tuple(meta.shape)}")
    groups = cols // 4
    shifts = torch.arange(4, device=meta.device, dtype=torch.int32) * 4
    nibbles = ((meta.to(torch.int32).unsqueeze(-1) >> shifts) & 0xF).reshape(meta.shape[0], -1)[:, :groups]
    lut = torch.tensor([bool(VALID_2TO4_NIBBLES >> n & 1) for n in range(16)], device=meta.device)
    ok = lut[nibbles]
    if not bool(ok.all()):
        row, group = (int(v) for v in (~ok).nonzero()[0])
        raise ValueError(f"{name}: row {row}, columns {4 * group}..{4 * group + 3}: nibble "
                         f"{int(nibbles[row, group]):04b} is not two increasing column indices "
                         "(corrupt or foreign 2:4 metadata)")
    _VALIDATED_META[meta] = meta._version


def check_2to4_meta_once(meta: torch.Tensor, cols: int, *, name: str = "meta") -> None:
    """:func:`check_2to4_meta`, skipped when this very tensor was validated and not written to
    since (its version counter: in-place writes and ``load_state_dict`` copies bump it). The
    kernels' entry points call this, so a layer's metadata is checked once, not per call."""
    if _VALIDATED_META.get(meta) != meta._version:
        check_2to4_meta(meta, cols, name=name)


def aligned(t: torch.Tensor, alignment: int) -> torch.Tensor:
    """``t`` contiguous with its data address a multiple of ``alignment`` bytes: ``t`` itself
    when it already is, else one copy into fresh (allocator-aligned) storage. A contiguous view
    at an odd storage offset (``x[1:]`` of float16) is what ``.contiguous()`` leaves as it is."""
    t = t.contiguous()
    return t if t.data_ptr() % alignment == 0 else t.clone()


def check_attention_operands(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None) -> None:
    """Raise unless ``q [B, H, Lq, D]``, ``k [B, H, Lk, D]`` and ``v [B, H, Lk, Dv]`` are
    float32/64/16 or bfloat16 tensors of one dtype and device and ``scale`` is None or finite
    in float32 (the rules of
    csrc/cpu/attention_ops.cpp, for every device)."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.dim() != 4:
            raise ValueError(f"attention: {name} must be 4-D [batch, heads, tokens, head_dim], got {t.dim()}-D")
        if t.dtype not in (torch.float32, torch.float64, torch.float16, torch.bfloat16):
            raise TypeError(f"attention: {name} must be float32, float64, float16 or bfloat16, got {t.dtype}")
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"attention: q, k and v must share one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    check_same_device("attention", q=q, k=k, v=v)
    if k.shape[:2] != q.shape[:2] or v.shape[:2] != q.shape[:2]:
        raise ValueError(f"attention: q, k and v must share batch and heads, got q {tuple(q.shape)}, "
                         f"k {tuple(k.shape)}, v {tuple(v.shape)}")
    if k.shape[3] != q.shape[3]:
        raise ValueError(f"attention: k's head_dim must be q's ({q.shape[3]}), got {k.shape[3]}")
    if v.shape[2] != k.shape[2]:
        raise ValueError(f"attention: v must have k's tokens ({k.shape[2]}), got {v.shape[2]}")
    if scale is not None and not (math.isfinite(scale) and abs(scale) <= torch.finfo(torch.float32).max):
        raise ValueError(f"attention: scale must be finite in float32, got {scale}")
