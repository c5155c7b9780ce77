"""Compact weight formats: plain containers, no kernels.

Every format holds one ``[N, K]`` weight (``N`` = out_features, ``K`` = in_features) and has
``from_dense(weight, mask, ...)``, ``to_dense()`` (exact: the masked weight, ``+0.0`` where
pruned), ``nbytes`` (every stored array: values, indices, metadata, padding), ``validate()``
(``ValueError`` naming the bad field) and ``to(device=None, dtype=None)`` (dtype changes the
values only). Formats know nothing about kernels (they import no op); ``sparse_prune.ops`` and
``sparse_prune.backends`` do.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields, replace

import torch

from sparse_prune.checks import check_2to4_meta, check_nm_mask, check_weight_and_mask
from sparse_prune.constants import DEFAULT_BSR_BLOCK, FORMAT_DTYPES
from sparse_prune.kernels import reference

_FLOATS = FORMAT_DTYPES


def _check_pair(weight: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    return check_weight_and_mask(weight, mask, _FLOATS)


def _checked_nm(mask: torch.Tensor) -> torch.Tensor:
    """The mask of a 2:4 weight: K a multiple of 4, at most two kept of every four columns."""
    if mask.shape[1] % 4:
        raise ValueError(f"weight.shape[1] (K = {mask.shape[1]}) must be a multiple of 4 for 2:4")
    check_nm_mask(mask, 2, 4)
    return mask


def _masked(weight: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return torch.where(mask, weight, torch.zeros((), dtype=weight.dtype, device=weight.device))


def _need(cond: bool, field: str, why: str) -> None:
    if not cond:
        raise ValueError(f"{field}: {why}")


def _check_common(fmt) -> tuple[int, int]:
    """What every format's ``validate`` checks first: ``shape`` a pair of ints >= 0, ``values`` a
    floating tensor of :data:`~sparse_prune.constants.FORMAT_DTYPES`, every array on one device
    and of a non-floating dtype except ``values``. Returns ``shape``."""
    shape = fmt.shape
    _need(isinstance(shape, tuple) and len(shape) == 2
          and all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in shape),
          "shape", f"must be a pair of ints >= 0 (N, K), got {shape!r}")
    _need(isinstance(fmt.values, torch.Tensor), "values", "must be a tensor")
    _need(fmt.values.dtype in _FLOATS, "values", f"dtype must be one of {_FLOATS}, got {fmt.values.dtype}")
    for f in fields(fmt):
        value = getattr(fmt, f.name)
        if f.name != "values" and isinstance(value, torch.Tensor):
            _need(value.device == fmt.values.device, f.name,
                  f"is on {value.device}, values on {fmt.values.device}: all arrays must be on one device")
            _need(not value.is_floating_point() and not value.is_complex(), f.name,
                  f"must be an integer tensor, got {value.dtype}")
    return shape


def _in_range(idx: torch.Tensor, limit: int) -> bool:
    """Every index in ``[0, limit)``: one min/max pass in the index's own dtype (no int64 copy)."""
    low, high = torch.aminmax(idx)
    return int(low) >= 0 and int(high) < limit


def _increasing_per_row(cols: torch.Tensor, crow: torch.Tensor) -> bool:
    """Columns strictly increasing inside every row of a compressed-rows layout (``crow``
    already checked: 0 first, non-decreasing, nnz last): one vectorised pass."""
    up = cols[1:] > cols[:-1]
    starts = crow[1:-1]
    starts = starts[(starts > 0) & (starts < cols.numel())] - 1  # a row's first entry may drop
    up[starts] = True
    return bool(up.all())


def _check_index(t: torch.Tensor, field: str, dtypes: tuple[torch.dtype, ...]) -> None:
    _need(isinstance(t, torch.Tensor), field, "must be a tensor")
    _need(t.dtype in dtypes, field, f"dtype must be one of {dtypes}, got {t.dtype}")
    _need(t.dim() == 1, field, f"must be 1-D, got shape {tuple(t.shape)}")


class WeightFormat:
    """Shared behaviour of the dataclass formats below."""

    shape: tuple[int, int]

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self._tensors())

    @property
    def dtype(self) -> torch.dtype:
        return self.values.dtype

    @property
    def device(self) -> torch.device:
        return self.values.device

    @property
    def density(self) -> float:
        """Kept weights / (N·K), counting stored explicit zeros as pruned."""
        total = self.shape[0] * self.shape[1]
        return float((self.to_dense() != 0).sum()) / total if total else 1.0

    def _tensors(self) -> list[torch.Tensor]:
        return [getattr(self, f.name) for f in fields(self) if isinstance(getattr(self, f.name), torch.Tensor)]

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None):
        changes = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, torch.Tensor):
                is_values = f.name == "values"
                changes[f.name] = value.to(device=device, dtype=dtype if is_values else None)
        return replace(self, **changes)


@dataclass(frozen=True)
class Dense(WeightFormat):
    """The masked weight stored densely: the honest baseline every sparse format must beat."""

    values: torch.Tensor
    shape: tuple[int, int]

    @classmethod
    def from_dense(cls, weight: torch.Tensor, mask: torch.Tensor | None = None) -> Dense:
        mask = _check_pair(weight, mask)
        return cls(_masked(weight, mask).contiguous(), tuple(weight.shape))

    def to_dense(self) -> torch.Tensor:
        return self.values

    def validate(self) -> None:
        _check_common(self)
        _need(tuple(self.values.shape) == tuple(self.shape), "values", f"shape must be {tuple(self.shape)}")


@dataclass(frozen=True)
class Shrunk(WeightFormat):
    """The weight restricted to its kept output rows and input columns.

    ``values [len(out_index), len(in_index)]``; ``y[..., out_index] = x[..., in_index] @ values.T``
    and the other outputs are 0 (plus bias). Indices are sorted int64.
    """

    values: torch.Tensor
    out_index: torch.Tensor
    in_index: torch.Tensor
    shape: tuple[int, int]

    @classmethod
    def from_dense(cls, weight: torch.Tensor, mask: torch.Tensor | None = None, round_to: int = 1) -> Shrunk:
        """Keep rows/columns holding any kept weight; the mask must be a rows × columns product.

        ``round_to`` pads the kept widths up to a multiple (with zero rows/columns, lowest
        pruned indices first; capped at N/K) so tensor-core GEMMs see aligned shapes.
        """
        mask = _check_pair(weight, mask)
        if isinstance(round_to, bool) or not isinstance(round_to, int) or round_to < 1:
            raise ValueError(f"round_to must be an int >= 1, got {round_to!r}")
        rows, cols = mask.any(1), mask.any(0)
        if not torch.equal(mask, rows[:, None] & cols[None, :]):
            bad = (mask != (rows[:, None] & cols[None, :])).nonzero()[0].tolist()
            raise ValueError(
                f"mask is not structured (whole rows × whole columns): weight {tuple(bad)} is "
                f"pruned inside a kept row and a kept column; use 'csr', 'bsr' or '2:4' instead"
            )
        rows, cols = _pad_to(rows, round_to), _pad_to(cols, round_to)
        out_index, in_index = rows.nonzero().flatten(), cols.nonzero().flatten()
        values = _masked(weight, mask)[out_index][:, in_index].contiguous()
        return cls(values, out_index, in_index, tuple(weight.shape))

    def to_dense(self) -> torch.Tensor:
        return reference.shrunk_to_dense(self.values, self.out_index, self.in_index, *self.shape)

    def validate(self) -> None:
        n, k = _check_common(self)
        for field, idx, limit in (("out_index", self.out_index, n), ("in_index", self.in_index, k)):
            _check_index(idx, field, (torch.int64, torch.int32))
            if idx.numel():
                _need(int(idx.min()) >= 0 and int(idx.max()) < limit, field, f"indices must lie in [0, {limit})")
                _need(bool((idx[1:] > idx[:-1]).all()), field, "must be strictly increasing")
        _need(self.values.dim() == 2 and tuple(self.values.shape) == (len(self.out_index), len(self.in_index)),
              "values", f"shape {tuple(self.values.shape)} must be [len(out_index), len(in_index)]")


def _pad_to(keep: torch.Tensor, multiple: int) -> torch.Tensor:
    count = int(keep.sum())
    target = min(keep.numel(), math.ceil(count / multiple) * multiple) if count else 0
    if target > count:
        keep = keep.clone()
        keep[(~keep).nonzero().flatten()[: target - count]] = True
    return keep


@dataclass(frozen=True)
class SemiStructured(WeightFormat):
    """2:4 weight: ``values [N, K/2]`` + ``meta int16 [N, ceil(K/16)]`` (docs/semi_structured_layout.md)."""

    values: torch.Tensor
    meta: torch.Tensor
    shape: tuple[int, int]

    @classmethod
    def from_dense(cls, weight: torch.Tensor, mask: torch.Tensor | None = None) -> SemiStructured:
        """``ValueError`` naming the first group (row, columns) that keeps more than 2 of 4."""
        mask = _check_pair(weight, mask)
        values, meta = reference.compress_2to4(weight, _checked_nm(mask))
        check_2to4_meta(meta, weight.shape[1])  # valid by construction; recorded, so no kernel rechecks it
        return cls(values, meta, tuple(weight.shape))

    def to_dense(self) -> torch.Tensor:
        return reference.decompress_2to4(self.values, self.meta, self.shape[1])

    def validate(self) -> None:
        n, k = _check_common(self)
        _need(k % 4 == 0, "shape", f"K = {k} must be a multiple of 4")
        _need(tuple(self.values.shape) == (n, k // 2), "values", f"shape must be {(n, k // 2)}")
        _need(self.meta.dtype == torch.int16, "meta", f"dtype must be torch.int16, got {self.meta.dtype}")
        _need(tuple(self.meta.shape) == (n, (k + 15) // 16), "meta", f"shape must be {(n, (k + 15) // 16)}")
        check_2to4_meta(self.meta, k, name="meta")  # each group: two increasing column indices


@dataclass(frozen=True)
class CSR(WeightFormat):
    """Compressed sparse rows: ``values [nnz]``, ``crow_indices [N+1]``, ``col_indices [nnz]``.

    Columns sorted within each row; empty rows allowed. Indices are int32 (``col_indices``
    may be int16 when K ≤ 32767: ``index_dtype=torch.int16``).
    """

    values: torch.Tensor
    crow_indices: torch.Tensor
    col_indices: torch.Tensor
    shape: tuple[int, int]

    def row_order(self) -> torch.Tensor:
        """Rows longest-first (int32 ``[N]``, stable): the schedule of the GPU CSR kernels,
        computed once when a layer is built, never per call."""
        lengths = self.crow_indices[1:] - self.crow_indices[:-1]
        return torch.argsort(lengths, descending=True, stable=True).to(torch.int32)

    @classmethod
    def from_dense(cls, weight: torch.Tensor, mask: torch.Tensor | None = None,
                   index_dtype: torch.dtype = torch.int32) -> CSR:
        mask = _check_pair(weight, mask)
        n, k = weight.shape
        if index_dtype not in (torch.int32, torch.int16):
            raise ValueError(f"index_dtype must be torch.int32 or torch.int16, got {index_dtype}")
        if index_dtype == torch.int16 and k > 32767:
            raise ValueError(f"index_dtype=torch.int16 needs K <= 32767, got K = {k}")
        if mask.sum() >= 2**31:
            raise ValueError("more than 2**31 - 1 kept weights do not fit int32 crow_indices")
        rows, cols = mask.nonzero(as_tuple=True)  # row-major order: columns sorted per row
        crow = torch.zeros(n + 1, dtype=torch.int64, device=weight.device)
        crow[1:] = torch.bincount(rows, minlength=n).cumsum(0)
        return cls(weight[rows, cols].contiguous(), crow.to(torch.int32), cols.to(index_dtype), (n, k))

    def to_dense(self) -> torch.Tensor:
        return reference.csr_to_dense(self.values, self.crow_indices, self.col_indices, *self.shape)

    @property
    def nnz(self) -> int:
        return self.values.numel()

    def validate(self) -> None:
        n, k = _check_common(self)
        _check_index(self.crow_indices, "crow_indices", (torch.int32, torch.int64))
        _check_index(self.col_indices, "col_indices", (torch.int32, torch.int16, torch.int64))
        _need(self.values.dim() == 1, "values", "must be 1-D [nnz]")
        _need(self.crow_indices.numel() == n + 1, "crow_indices", f"length must be N + 1 = {n + 1}")
        crow = self.crow_indices.long()
        _need(int(crow[0]) == 0, "crow_indices", "must start at 0")
        _need(bool((crow[1:] >= crow[:-1]).all()), "crow_indices", "must be non-decreasing")
        _need(int(crow[-1]) == self.values.numel() == self.col_indices.numel(), "crow_indices",
              f"last entry ({int(crow[-1])}) must equal len(values) ({self.values.numel()}) "
              f"and len(col_indices) ({self.col_indices.numel()})")
        if self.col_indices.numel():
            _need(_in_range(self.col_indices, k), "col_indices", f"must lie in [0, {k})")
            _need(_increasing_per_row(self.col_indices, crow), "col_indices",
                  "must be strictly increasing within each row")


@dataclass(frozen=True)
class BSR(WeightFormat):
    """Block sparse rows with blocks ``(bm, bk)``: ``values [nblocks, bm, bk]``,
    ``crow_indices [ceil(N/bm) + 1]``, ``col_indices [nblocks]`` (block columns, sorted).

    Every block holding a kept weight is stored whole (pruned weights inside it are zeros).
    N and K are padded up to multiples of ``bm``/``bk``; the padding is zeros inside the edge
    blocks and is counted in ``nbytes``.
    """

    values: torch.Tensor
    crow_indices: torch.Tensor
    col_indices: torch.Tensor
    shape: tuple[int, int]
    block: tuple[int, int]

    @classmethod
    def from_dense(cls, weight: torch.Tensor, mask: torch.Tensor | None = None,
                   block: tuple[int, int] = DEFAULT_BSR_BLOCK) -> BSR:
        mask = _check_pair(weight, mask)
        bm, bk = _check_block(block)
        n, k = weight.shape
        pn, pk = -(-n // bm) * bm, -(-k // bk) * bk
        dense = torch.zeros((pn, pk), dtype=weight.dtype, device=weight.device)
        dense[:n, :k] = _masked(weight, mask)
        keep = torch.zeros((pn, pk), dtype=torch.bool, device=weight.device)
        keep[:n, :k] = mask
        blocks = dense.reshape(pn // bm, bm, pk // bk, bk).transpose(1, 2)  # [R, C, bm, bk]
        occupied = keep.reshape(pn // bm, bm, pk // bk, bk).any(dim=(1, 3))  # [R, C]
        rows, cols = occupied.nonzero(as_tuple=True)
        crow = torch.zeros(pn // bm + 1, dtype=torch.int64, device=weight.device)
        crow[1:] = torch.bincount(rows, minlength=pn // bm).cumsum(0)
        return cls(blocks[rows, cols].contiguous(), crow.to(torch.int32), cols.to(torch.int32), (n, k), (bm, bk))

    def to_dense(self) -> torch.Tensor:
        return reference.bsr_to_dense(self.values, self.crow_indices, self.col_indices, *self.shape).contiguous()

    @property
    def padded_shape(self) -> tuple[int, int]:
        return -(-self.shape[0] // self.block[0]) * self.block[0], -(-self.shape[1] // self.block[1]) * self.block[1]

    def validate(self) -> None:
        _check_common(self)
        bm, bk = _check_block(self.block)
        pn, pk = self.padded_shape
        nr, nc = pn // bm, pk // bk
        _check_index(self.crow_indices, "crow_indices", (torch.int32, torch.int64))
        _check_index(self.col_indices, "col_indices", (torch.int32, torch.int64))
        _need(self.values.dim() == 3 and tuple(self.values.shape[1:]) == (bm, bk), "values",
              f"shape must be [nblocks, {bm}, {bk}], got {tuple(self.values.shape)}")
        _need(self.crow_indices.numel() == nr + 1, "crow_indices", f"length must be N/bm + 1 = {nr + 1}")
        crow = self.crow_indices.long()
        _need(int(crow[0]) == 0, "crow_indices", "must start at 0")
        _need(bool((crow[1:] >= crow[:-1]).all()), "crow_indices", "must be non-decreasing")
        _need(int(crow[-1]) == self.values.shape[0] == self.col_indices.numel(), "crow_indices",
              "last entry must equal the number of blocks in values and col_indices")
        cols = self.col_indices
        if cols.numel():
            _need(_in_range(cols, nc), "col_indices", f"block columns must lie in [0, {nc})")
            _need(_increasing_per_row(cols, crow), "col_indices", "must be strictly increasing within each block row")
        pad_k = pk - self.shape[1]
        if pad_k and cols.numel():  # the CPU kernel multiplies the padding with zero inputs
            last = self.values[cols == nc - 1][:, :, bk - pad_k:]
            _need(bool((last == 0).all()), "values", "the padding past K of the last block column must be 0")


MAX_BLOCK_SIDE = 1 << 16


def _check_block(block) -> tuple[int, int]:
    try:
        bm, bk = block
    except (TypeError, ValueError):
        raise ValueError(f"block must be a pair (bm, bk) of positive ints, got {block!r}") from None
    for v in (bm, bk):
        if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
            raise ValueError(f"block must be a pair (bm, bk) of positive ints, got {block!r}")
        if v > MAX_BLOCK_SIDE:  # the CPU kernels' bound too; a 1e9 side would pad to 4e18 bytes
            raise ValueError(f"block sides must be at most {MAX_BLOCK_SIDE}, got {block!r}")
    return bm, bk


FORMATS = {"dense": Dense, "shrink": Shrunk, "2:4": SemiStructured, "csr": CSR, "bsr": BSR}


def format_name(fmt: WeightFormat) -> str:
    """The :data:`FORMATS` key of a format object (``TypeError`` for anything else)."""
    for name, cls in FORMATS.items():
        if type(fmt) is cls:
            return name
    raise TypeError(f"expected one of the formats {', '.join(c.__name__ for c in FORMATS.values())}, "
                    f"got {type(fmt).__name__}")
