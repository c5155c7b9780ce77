"""CSR SpMM in Triton: ``Y [M, N] = X [M, K] · Wᵀ (+ b)``, W in CSR ``[N, K]``.

One program computes one weight row for a tile of ``BLOCK_M`` inputs. X is read transposed
(``Xᵀ [K, M]``, one copy per call) so the ``BLOCK_NNZ`` gathered columns of a chunk are each a
contiguous, coalesced run of ``BLOCK_M`` values; the result is written as ``Yᵀ`` (coalesced) and
transposed back. Load balance: programs take rows longest-first (``row_order``, computed once
by ``formats.CSR.row_order`` when the layer is built), so a long row starts early instead of
stalling the tail of the grid.
Accumulation in fp32; empty rows and nnz = 0 give the bias (or 0).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from sparse_prune.kernels.triton_common import check_linear_inputs, configs
from sparse_prune.kernels.triton_smem import pipelined, pruner

# Every config is checked for correctness on a GPU (tests/test_triton_kernels.py).
FULL_CONFIGS = [triton.Config({"BLOCK_M": bm, "BLOCK_NNZ": bn}, num_warps=w) for bm, bn, w in ((32, 32, 4), (64, 16, 4), (128, 16, 4), (64, 64, 8), (256, 8, 8))]

# The one config of the interpreter and of SPARSE_PRUNE_TUNE=0 runs.
UNTUNED_CONFIGS = [triton.Config({"BLOCK_M": 128, "BLOCK_NNZ": 32})]


def smem_estimate(kw: dict, num_stages: int, dtype: torch.dtype, **constexprs) -> int:
    """Upper bound of the shared memory of one config (triton_smem.pipelined): per chunk the
    column indices and values and the gathered Xᵀ tile, plus the column-sum reduction scratch."""
    bm, bnz = kw["BLOCK_M"], kw["BLOCK_NNZ"]
    e = torch.empty((), dtype=dtype).element_size()
    return pipelined(num_stages, bnz * 8, bnz * e, bnz * bm * e, staged=bnz * bm * 4)


@triton.autotune(
    configs=configs(FULL_CONFIGS, UNTUNED_CONFIGS),
    key=["M", "N"],
    prune_configs_by={"early_config_prune": pruner(smem_estimate, dtype_arg="xt_ptr")},
)
@triton.jit
def _csr_kernel(xt_ptr, val_ptr, crow_ptr, col_ptr, order_ptr, bias_ptr, yt_ptr, M, N,
                HAS_BIAS: tl.constexpr, GELU: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_NNZ: tl.constexpr):
    row = tl.load(order_ptr + tl.program_id(0)).to(tl.int64)
    offs_m = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    m_ok = offs_m < M
    start = tl.load(crow_ptr + row).to(tl.int64)
    end = tl.load(crow_ptr + row + 1).to(tl.int64)
    acc = tl.zeros([BLOCK_M], dtype=tl.float32)
    for j in range(start, end, BLOCK_NNZ):
        offs = j + tl.arange(0, BLOCK_NNZ)
        nz_ok = offs < end
        cols = tl.load(col_ptr + offs, mask=nz_ok, other=0).to(tl.int64)
        vals = tl.load(val_ptr + offs, mask=nz_ok, other=0.0).to(tl.float32)
        xs = tl.load(xt_ptr + cols[:, None] * M + offs_m[None, :], mask=nz_ok[:, None] & m_ok[None, :], other=0.0)
        acc += tl.sum(xs.to(tl.float32) * vals[:, None], axis=0)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + row).to(tl.float32)
    if GELU:  # exact (erf) GELU, as F.gelu: fused so fc1 -> GELU is one kernel
        acc = 0.5 * acc * (1.0 + tl.math.erf(acc * 0.7071067811865476))
    tl.store(yt_ptr + row * M + offs_m, acc.to(yt_ptr.dtype.element_ty), mask=m_ok)


def csr_linear(x: torch.Tensor, values: torch.Tensor, crow: torch.Tensor, col: torch.Tensor,
               row_order: torch.Tensor | None, out_features: int, bias: torch.Tensor | None,
               gelu: bool = False) -> torch.Tensor:
    """``row_order``: rows longest-first (int32 ``[out_features]``); ``None`` computes it here
    (an argsort per call: SparseLinear passes the one it computed at construction)."""
    x = check_linear_inputs("csr_linear_triton", x, values, bias, out_features, crow_indices=crow,
                            col_indices=col, row_order=row_order)
    if crow.numel() != out_features + 1:
        raise ValueError(f"csr_linear_triton: crow_indices must hold out_features + 1 = {out_features + 1} "
                         f"entries, got {crow.numel()}")
    if row_order is None:
        row_order = (crow[1:] - crow[:-1]).argsort(descending=True, stable=True).to(torch.int32)
    if row_order.dtype != torch.int32 or tuple(row_order.shape) != (out_features,):
        raise ValueError(f"csr_linear_triton: row_order must be int32 [{out_features}] (formats.CSR.row_order), "
                         f"got {row_order.dtype} {tuple(row_order.shape)}")
    m = x.shape[0]
    yt = torch.empty((out_features, m), dtype=x.dtype, device=x.device)
    if m == 0 or out_features == 0:
        return yt.t().contiguous()
    xt = x.t().contiguous()

    def grid(meta):
        return (out_features, triton.cdiv(m, meta["BLOCK_M"]))

    _csr_kernel[grid](xt, values, crow, col.contiguous(), row_order, bias if bias is not None else values,
                      yt, m, out_features, HAS_BIAS=bias is not None, GELU=gelu)
    return yt.t().contiguous()
