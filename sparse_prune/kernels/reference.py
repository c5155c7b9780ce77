"""Pure-PyTorch reference of every op: the test oracle and the CPU path.

Each function is vectorised PyTorch that runs on any device. The compiled and Triton
kernels must agree with these bit for bit where they only move data (compression) and
within dtype tolerance where they compute.
"""

from __future__ import annotations

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
# calls F.linear (then the exact GELU when asked): it is the oracle, and the CPU kernel of an op
# only where sparse_prune._C_cpu has none or is not loaded.


def dense_linear(x, weight, bias):
    return torch.nn.functional.linear(x, weight, bias)


def _act(y: torch.Tensor, gelu: bool) -> torch.Tensor:
    return torch.nn.functional.gelu(y) if gelu else y


def csr_linear(x, values, crow, col, out_features, bias, row_order=None, gelu=False):
    # row_order (the op's GPU row schedule) does not change the result: ignored here
    k = x.shape[-1]
    return _act(dense_linear(x, csr_to_dense(values, crow, col, out_features, k), bias), gelu)


def bsr_linear(x, values, crow, col, out_features, bias, gelu=False):
    k = x.shape[-1]
    return _act(dense_linear(x, bsr_to_dense(values, crow, col, out_features, k), bias), gelu)


def semi24_linear(x, values, meta, bias, gelu=False):
    return _act(dense_linear(x, decompress_2to4(values, meta, x.shape[-1]), bias), gelu)


def shrunk_linear(x, values, out_index, in_index, out_features, bias):
    # Only the kept block is multiplied; pruned outputs are 0 (+ bias).
    small = torch.nn.functional.linear(x.index_select(-1, in_index.long()), values)
    y = x.new_zeros((x.shape[0], out_features))
    y.index_copy_(-1, out_index.long(), small)
    return y + bias if bias is not None else y


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None) -> torch.Tensor:
    """``softmax(scale · q·kᵀ) · v`` (``scale`` None: 1/√head_dim) through torch's SDPA, for
    q [B, H, Lq, D], k [B, H, Lk, D], v [B, H, Lk, Dv] (checked by ``sparse_prune.ops``).
    Returns [B, H, Lq, Dv] laid out as [B, Lq, H, Dv] in memory, as the CPU kernel does."""
    b, h, lq, _ = q.shape
    out = q.new_empty((b, lq, h, v.shape[3])).transpose(1, 2)
    return out.copy_(torch.nn.functional.scaled_dot_product_attention(q, k, v, scale=scale))
