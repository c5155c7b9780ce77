"""Shrunk GEMM in Triton with the gather and scatter fused: ``y[:, out_index] = x[:, in_index] · Vᵀ``.

For the layers dependency-aware shrinking cannot absorb. One program computes a
``[BLOCK_M, BLOCK_N]`` tile of the kept outputs: it loads X's kept columns straight from X
(``in_index``, no gathered copy), multiplies with the compact ``values [N', K']`` and stores
into the output columns ``out_index`` (no scattered copy). Outputs that were pruned whole are
the bias (or 0), written up front only when some exist.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from sparse_prune.kernels.triton_common import check_linear_inputs, configs, dot_precision
from sparse_prune.kernels.triton_smem import pipelined, pruner

# Every config is checked for correctness on a GPU (tests/test_triton_kernels.py).
FULL_CONFIGS = [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk}, num_warps=w, num_stages=s) for bm, bn, bk, w, s in ((32, 64, 64, 4, 4), (64, 64, 64, 4, 3), (128, 128, 64, 8, 3), (128, 64, 32, 4, 4), (64, 128, 64, 4, 3))]

# The one config of the interpreter and of SPARSE_PRUNE_TUNE=0 runs.
UNTUNED_CONFIGS = [triton.Config({"BLOCK_M": 64, "BLOCK_N": 32, "BLOCK_K": 32})]


def smem_estimate(kw: dict, num_stages: int, dtype: torch.dtype, **constexprs) -> int:
    """Upper bound of the shared memory of one config (triton_smem.pipelined): per K step the
    int64 column indices, the gathered X tile and the weight tile."""
    bm, bn, bk = kw["BLOCK_M"], kw["BLOCK_N"], kw["BLOCK_K"]
    e = torch.empty((), dtype=dtype).element_size()
    return pipelined(num_stages, bk * 8, bm * bk * e, bk * bn * e)


@triton.autotune(
    configs=configs(FULL_CONFIGS, UNTUNED_CONFIGS),
    key=["M", "NK", "KK"],
    prune_configs_by={"early_config_prune": pruner(smem_estimate)},
)
@triton.jit
def _shrunk_kernel(x_ptr, val_ptr, out_idx_ptr, in_idx_ptr, bias_ptr, y_ptr, M, N, K, NK, KK,
                   HAS_BIAS: tl.constexpr, GELU: tl.constexpr, PRECISION: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    offs_m = (tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    m_ok, n_ok = offs_m < M, offs_n < NK
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, KK, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_ok = offs_k < KK
        cols = tl.load(in_idx_ptr + offs_k, mask=k_ok, other=0).to(tl.int64)
        xs = tl.load(x_ptr + offs_m[:, None] * K + cols[None, :], mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        w_t = tl.load(val_ptr + offs_n[None, :].to(tl.int64) * KK + offs_k[:, None],
                      mask=k_ok[:, None] & n_ok[None, :], other=0.0)
        acc = tl.dot(xs, w_t, acc, input_precision=PRECISION)
    rows = tl.load(out_idx_ptr + offs_n, mask=n_ok, other=0).to(tl.int64)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + rows, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    if GELU:  # exact (erf) GELU, as F.gelu: fused so fc1 -> GELU is one kernel
        acc = 0.5 * acc * (1.0 + tl.math.erf(acc * 0.7071067811865476))
    tl.store(y_ptr + offs_m[:, None] * N + rows[None, :], acc.to(y_ptr.dtype.element_ty),
             mask=m_ok[:, None] & n_ok[None, :])


def shrunk_linear(x: torch.Tensor, values: torch.Tensor, out_index: torch.Tensor, in_index: torch.Tensor,
                  out_features: int, bias: torch.Tensor | None, gelu: bool = False) -> torch.Tensor:
    x = check_linear_inputs("shrunk_linear_triton", x, values, bias, out_features, out_index=out_index,
                            in_index=in_index)
    nk, kk = len(out_index), len(in_index)
    if values.dim() != 2 or tuple(values.shape) != (nk, kk):
        raise ValueError(f"shrunk_linear_triton: values must be [len(out_index), len(in_index)] = [{nk}, {kk}], "
                         f"got {tuple(values.shape)}")
    m, k = x.shape
    if nk < out_features:  # whole pruned outputs: bias or 0, written once
        fill = torch.nn.functional.gelu(bias) if gelu and bias is not None else bias  # GELU(0) = 0
        y = (fill.expand(m, out_features).clone(memory_format=torch.contiguous_format) if bias is not None
             else torch.zeros((m, out_features), dtype=x.dtype, device=x.device))
    else:
        y = torch.empty((m, out_features), dtype=x.dtype, device=x.device)
    if m == 0 or nk == 0:
        return y

    def grid(meta):
        return (triton.cdiv(m, meta["BLOCK_M"]), triton.cdiv(nk, meta["BLOCK_N"]))

    _shrunk_kernel[grid](x, values.contiguous(), out_index.contiguous(), in_index.contiguous(),
                         bias if bias is not None else values, y, m, out_features, k, nk, kk,
                         HAS_BIAS=bias is not None, GELU=gelu, PRECISION=dot_precision(x.dtype))
    return y
