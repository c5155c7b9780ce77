"""Pure-PyTorch reference of every op: the test oracle and the CPU path.

Each function is vectorised PyTorch that runs on any device. The compiled and Triton
kernels must agree with these bit for bit where they only move data (compression) and
within dtype tolerance where they compute.
"""

from __future__ import annotations

import warnings

import torch

# 2:4 layout, shared with csrc/compress_2to4.cu (see docs/semi_structured_layout.md):
# values [N, K/2]; meta int16 [N, ceil(K/16)], nibble j of word w = group 4w + j,
# bits [1:0] = column (0..3) of the first stored value, bits [3:2] = of the second.
GROUP = 4
GROUPS_PER_WORD = 4


def compress_2to4(weight: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Compress a 2:4 weight into ``(values [N, K/2], meta int16 [N, ceil(K/16)])``.

    Expects ``weight`` 2-D with K % 4 == 0 and a bool ``mask`` of the same shape keeping at
    most two of every four consecutive columns (checked by ``sparse_prune.ops``). Groups that
    keep fewer than two are padded with their lowest unkept columns, stored as +0.0.
    """
    rows, cols = weight.shape
    groups = cols // GROUP
    m = mask.reshape(rows, groups, GROUP)
    col = torch.arange(GROUP, device=weight.device)
    # Kept columns first (in column order), then unkept ones: the first two are stored.
    priority = (~m).to(torch.int64) * GROUP + col
    chosen = priority.argsort(dim=-1)[..., :2].sort(dim=-1).values  # [rows, groups, 2]
    kept = torch.where(m, weight.reshape(rows, groups, GROUP), torch.zeros((), dtype=weight.dtype, device=weight.device))
    values = kept.gather(-1, chosen).reshape(rows, groups * 2)

    nibbles = (chosen[..., 0] | (chosen[..., 1] << 2)).to(torch.int32)  # [rows, groups]
    words = -(-groups // GROUPS_PER_WORD)
    pad = words * GROUPS_PER_WORD - groups
    if pad:
        nibbles = torch.nn.functional.pad(nibbles, (0, pad))
    shifts = torch.arange(GROUPS_PER_WORD, device=weight.device, dtype=torch.int32) * 4
    packed = (nibbles.reshape(rows, words, GROUPS_PER_WORD) << shifts).sum(-1, dtype=torch.int32)
    packed = torch.where(packed >= 1 << 15, packed - (1 << 16), packed)
    return values.contiguous(), packed.to(torch.int16)


def unpack_2to4_indices(meta: torch.Tensor, cols: int) -> torch.Tensor:
    """Column (0..3 within its group) of every stored value: int64 ``[N, K/2]``."""
    rows = meta.shape[0]
    groups = cols // GROUP
    shifts = torch.arange(GROUPS_PER_WORD, device=meta.device, dtype=torch.int32) * 4
    nibbles = (meta.to(torch.int32).unsqueeze(-1) >> shifts) & 0xF  # [rows, words, 4]
    nibbles = nibbles.reshape(rows, meta.shape[1] * GROUPS_PER_WORD)[:, :groups]
    return torch.stack((nibbles & 0x3, (nibbles >> 2) & 0x3), dim=-1).reshape(rows, groups * 2).long()


def decompress_2to4(values: torch.Tensor, meta: torch.Tensor, cols: int) -> torch.Tensor:
    """Inverse of :func:`compress_2to4`: the dense ``[N, K]`` weight with zeros restored."""
    rows = values.shape[0]
    groups = cols // GROUP
    within = unpack_2to4_indices(meta, cols)
    base = torch.arange(groups, device=values.device).repeat_interleave(2) * GROUP
    dense = torch.zeros(rows, cols, dtype=values.dtype, device=values.device)
    dense.scatter_(1, within + base, values)
    return dense


# ---------------------------------------------------------------------------------------
# Dense reconstruction of each format (shared by formats.to_dense and the linear references)


def csr_to_dense(values: torch.Tensor, crow: torch.Tensor, col: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    counts = (crow[1:] - crow[:-1]).long()
    row_of = torch.repeat_interleave(torch.arange(rows, device=values.device), counts)
    dense = values.new_zeros((rows, cols))
    dense[row_of, col.long()] = values
    return dense


def bsr_to_dense(values: torch.Tensor, crow: torch.Tensor, col: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    bm, bk = values.shape[1:]
    nr, nc = -(-rows // bm), -(-cols // bk)
    counts = (crow[1:] - crow[:-1]).long()
    row_of = torch.repeat_interleave(torch.arange(nr, device=values.device), counts)
    grid = values.new_zeros((nr, nc, bm, bk))
    grid[row_of, col.long()] = values
    return grid.transpose(1, 2).reshape(nr * bm, nc * bk)[:rows, :cols]


def shrunk_to_dense(values: torch.Tensor, out_index: torch.Tensor, in_index: torch.Tensor,
                    rows: int, cols: int) -> torch.Tensor:
    dense = values.new_zeros((rows, cols))
    dense[out_index.long()[:, None], in_index.long()[None, :]] = values
    return dense


# ---------------------------------------------------------------------------------------
# Y = X·Wᵀ (+ bias) with W in a format; X is [M, K]. The reference rebuilds W densely and
# calls F.linear: it is the oracle. On the CPU, CSR/BSR take torch.sparse (MKL) instead where
# that was measured faster than rebuild + dense GEMM (see _cpu_sparse_wins).


def _cpu_sparse_wins(x: torch.Tensor, density: float) -> bool:
    """Whether torch.sparse.mm(W, xᵀ) beats rebuilding W + F.linear for this input.

    Thresholds from an interleaved sweep on this project's 2-core AVX-512 CPU (torch 2.14,
    MKL 2024.2), fp32, (N, K) ∈ {(768, 768), (3072, 768), (768, 3072)}, ratio = rebuild ms /
    sparse ms: M=8 wins 3.8-7.4x at any density ≤ 0.5; M=64 1.35-4.5x ≤ 0.5; M=197 and 394
    1.2-2.0x at 0.1 but 0.76-1.18x at 0.2; M=1576 1.4-1.7x at 0.05 but 0.76-0.92x at 0.1.
    MKL has no fp16/bf16 kernel, so those always rebuild.
    """
    if x.device.type != "cpu" or x.dtype not in (torch.float32, torch.float64):
        return False
    m = x.shape[0]
    limit = 0.5 if m <= 64 else 0.1 if m <= 512 else 0.05
    return round(density, 3) <= limit  # "90% pruned" rounds to a hair above 0.1 on odd shapes


def _sparse_mm(make, crow, col, values, shape, x, bias):
    """``x · Wᵀ (+ bias)`` with ``W = make(crow, col, values, shape)`` a torch sparse CSR/BSR."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Sparse (CSR|BSR) tensor support is in beta")
        weight = make(crow, col.to(crow.dtype), values, shape, check_invariants=False)
        y = torch.sparse.mm(weight, x.t()).t().contiguous()
    return y.add_(bias) if bias is not None else y


def dense_linear(x, weight, bias):
    return torch.nn.functional.linear(x, weight, bias)


def csr_linear(x, values, crow, col, out_features, bias, row_order=None):
    # row_order (the op's GPU row schedule) does not change the result: ignored here
    k = x.shape[-1]
    if _cpu_sparse_wins(x, values.numel() / max(1, out_features * k)):
        return _sparse_mm(torch.sparse_csr_tensor, crow, col, values, (out_features, k), x, bias)
    return dense_linear(x, csr_to_dense(values, crow, col, out_features, k), bias)


def bsr_linear(x, values, crow, col, out_features, bias):
    k = x.shape[-1]
    bm, bk = values.shape[1:]
    divisible = out_features % bm == 0 and k % bk == 0
    if bm == bk and divisible and _cpu_sparse_wins(x, values.shape[0] * bm * bk / max(1, out_features * k)):
        # torch's BSR needs the shape divisible by the block and MKL square blocks
        return _sparse_mm(torch.sparse_bsr_tensor, crow, col, values, (out_features, k), x, bias)
    return dense_linear(x, bsr_to_dense(values, crow, col, out_features, k), bias)


def semi24_linear(x, values, meta, bias):
    return dense_linear(x, decompress_2to4(values, meta, x.shape[-1]), bias)


def shrunk_linear(x, values, out_index, in_index, out_features, bias):
    # Only the kept block is multiplied; pruned outputs are 0 (+ bias).
    small = torch.nn.functional.linear(x.index_select(-1, in_index.long()), values)
    y = x.new_zeros((x.shape[0], out_features))
    y.index_copy_(-1, out_index.long(), small)
    return y + bias if bias is not None else y
