"""BSR SpMM in Triton: ``Y [M, N] = X [M, K] · Wᵀ (+ b)``, W in BSR with blocks ``(bm, bk)``.

One program owns one block-row of W (``bm`` outputs) and ``BLOCK_M`` inputs, and walks that
block-row's stored blocks: each is one ``tl.dot`` of the X tile ``[BLOCK_M, bk]`` with the
block transposed ``[bk, bm]``, accumulated in fp32. Block sides 16, 32 or 64 (``tl.dot``
needs at least 16). Padding of W beyond N/K (see formats.BSR) is masked out of loads/stores.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from sparse_prune.constants import BSR_BLOCK_SIDES as BLOCK_SIDES
from sparse_prune.kernels.triton_common import check_linear_inputs, configs, dot_precision
from sparse_prune.kernels.triton_smem import pipelined, pruner

# Every config is checked for correctness on a GPU (tests/test_triton_kernels.py).
FULL_CONFIGS = [triton.Config({"BLOCK_M": bm}, num_warps=w, num_stages=s) for bm, w, s in ((32, 4, 2), (64, 4, 3), (128, 4, 3), (128, 8, 3), (256, 8, 3))]

# The one config of the interpreter and of SPARSE_PRUNE_TUNE=0 runs.
UNTUNED_CONFIGS = [triton.Config({"BLOCK_M": 64})]


def smem_estimate(kw: dict, num_stages: int, dtype: torch.dtype, *, BM: int, BK: int, **constexprs) -> int:  # noqa: N803
    """Upper bound of the shared memory of one config (triton_smem.pipelined): per stored block
    the X tile ``[BLOCK_M, BK]`` and the block ``[BK, BM]``."""
    e = torch.empty((), dtype=dtype).element_size()
    return pipelined(num_stages, kw["BLOCK_M"] * BK * e, BK * BM * e)


@triton.autotune(
    configs=configs(FULL_CONFIGS, UNTUNED_CONFIGS),
    key=["M", "N", "K", "BM", "BK"],
    prune_configs_by={"early_config_prune": pruner(smem_estimate)},
)
@triton.jit
def _bsr_kernel(x_ptr, val_ptr, crow_ptr, col_ptr, bias_ptr, y_ptr, M, N, K,
                HAS_BIAS: tl.constexpr, GELU: tl.constexpr, BM: tl.constexpr, BK: tl.constexpr, PRECISION: tl.constexpr,
                BLOCK_M: tl.constexpr):
    brow = tl.program_id(0)
    offs_m = (tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    offs_n = brow * BM + tl.arange(0, BM)
    offs_bm = tl.arange(0, BM)
    offs_bk = tl.arange(0, BK)
    m_ok = offs_m < M
    start = tl.load(crow_ptr + brow).to(tl.int64)
    end = tl.load(crow_ptr + brow + 1).to(tl.int64)
    acc = tl.zeros([BLOCK_M, BM], dtype=tl.float32)
    for j in range(start, end):
        bcol = tl.load(col_ptr + j).to(tl.int64)
        kk = bcol * BK + offs_bk
        xs = tl.load(x_ptr + offs_m[:, None] * K + kk[None, :], mask=m_ok[:, None] & (kk < K)[None, :], other=0.0)
        block_t = tl.load(val_ptr + j * (BM * BK) + offs_bm[None, :] * BK + offs_bk[:, None])  # [BK, BM]
        acc = tl.dot(xs, block_t, acc, input_precision=PRECISION)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)[None, :]
    if GELU:  # exact (erf) GELU, as F.gelu: fused so fc1 -> GELU is one kernel
        acc = 0.5 * acc * (1.0 + tl.math.erf(acc * 0.7071067811865476))
    tl.store(y_ptr + offs_m[:, None] * N + offs_n[None, :], acc.to(y_ptr.dtype.element_ty),
             mask=m_ok[:, None] & (offs_n < N)[None, :])


def bsr_linear(x: torch.Tensor, values: torch.Tensor, crow: torch.Tensor, col: torch.Tensor,
               out_features: int, bias: torch.Tensor | None, gelu: bool = False) -> torch.Tensor:
    x = check_linear_inputs("bsr_linear_triton", x, values, bias, out_features, crow_indices=crow,
                            col_indices=col)
    if values.dim() != 3:
        raise ValueError(f"bsr_linear_triton: values must be [blocks, bm, bk], got {tuple(values.shape)}")
    bm, bk = values.shape[1:]
    if bm not in BLOCK_SIDES or bk not in BLOCK_SIDES:
        raise ValueError(f"bsr_linear_triton: block ({bm}, {bk}) not supported; each side must be one of "
                         f"{BLOCK_SIDES} (use the torch backend for other blocks)")
    block_rows = -(-out_features // bm)
    if crow.numel() != block_rows + 1:
        raise ValueError(f"bsr_linear_triton: crow_indices must hold ceil(N/bm) + 1 = {block_rows + 1} "
                         f"entries, got {crow.numel()}")
    m, k = x.shape
    y = torch.empty((m, out_features), dtype=x.dtype, device=x.device)
    if m == 0 or out_features == 0:
        return y

    def grid(meta):
        return (block_rows, triton.cdiv(m, meta["BLOCK_M"]))

    _bsr_kernel[grid](x, values.contiguous(), crow, col.contiguous(), bias if bias is not None else values, y,
                      m, out_features, k, HAS_BIAS=bias is not None, GELU=gelu, BM=bm, BK=bk,
                      PRECISION=dot_precision(x.dtype))
    return y
