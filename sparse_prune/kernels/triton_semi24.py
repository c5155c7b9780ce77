"""2:4 GEMM in Triton: ``Y [M, N] = X [M, K] · Wᵀ (+ b)``, W as ``values [N, K/2]`` + ``meta``.

Reads half the weight bytes (plus 1/16 for metadata; layout in docs/semi_structured_layout.md)
and expands each ``[BLOCK_K, BLOCK_N]`` tile in registers: dense column c of a row takes
``values[2g]`` when c is the group's first stored index, ``values[2g+1]`` when the second, else
0 (g = c // 4). Then one ``tl.dot`` per K step, fp32 accumulation. Wins where the GEMM is
memory-bound (small M); at large M the math is dense and costs the same as a dense GEMM.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from sparse_prune.checks import check_2to4_meta_once
from sparse_prune.kernels.triton_common import check_linear_inputs, configs, dot_precision
from sparse_prune.kernels.triton_smem import pipelined, pruner

# Every config is checked for correctness on a GPU (tests/test_triton_kernels.py).
FULL_CONFIGS = [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk}, num_warps=w, num_stages=s) for bm, bn, bk, w, s in ((16, 64, 64, 4, 4), (32, 64, 64, 4, 4), (64, 64, 64, 4, 3), (128, 128, 64, 8, 3), (128, 64, 32, 4, 4), (64, 128, 64, 4, 3))]

# The one config of the interpreter and of SPARSE_PRUNE_TUNE=0 runs.
UNTUNED_CONFIGS = [triton.Config({"BLOCK_M": 64, "BLOCK_N": 32, "BLOCK_K": 32})]


def smem_estimate(kw: dict, num_stages: int, dtype: torch.dtype, **constexprs) -> int:
    """Upper bound of the shared memory of one config (triton_smem.pipelined): per K step the X
    tile, the two value tiles and the int16 metadata tile; the expanded weight tile is staged
    once for the tensor cores."""
    bm, bn, bk = kw["BLOCK_M"], kw["BLOCK_N"], kw["BLOCK_K"]
    e = torch.empty((), dtype=dtype).element_size()
    return pipelined(num_stages, bm * bk * e, 2 * bk * bn * e, bk * bn * 2, staged=bk * bn * e)


@triton.autotune(
    configs=configs(FULL_CONFIGS, UNTUNED_CONFIGS),
    key=["M", "N", "K"],
    prune_configs_by={"early_config_prune": pruner(smem_estimate)},
)
@triton.jit
def _semi24_kernel(x_ptr, val_ptr, meta_ptr, bias_ptr, y_ptr, M, N, K, META_W,
                   HAS_BIAS: tl.constexpr, GELU: tl.constexpr, PRECISION: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    offs_m = (tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    offs_n = (tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    m_ok, n_ok = offs_m < M, offs_n < N
    half = K // 2
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_ok = offs_k < K
        xs = tl.load(x_ptr + offs_m[:, None] * K + offs_k[None, :], mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        group = offs_k // 4
        pos = (offs_k % 4)[:, None]
        tile_ok = k_ok[:, None] & n_ok[None, :]
        base = val_ptr + offs_n[None, :] * half + (2 * group)[:, None]
        v0 = tl.load(base, mask=tile_ok, other=0.0)
        v1 = tl.load(base + 1, mask=tile_ok, other=0.0)
        word = tl.load(meta_ptr + offs_n[None, :] * META_W + (offs_k // 16)[:, None], mask=tile_ok, other=0)
        nibble = (word.to(tl.int32) >> (4 * (group % 4))[:, None]) & 0xF
        w_t = tl.where(pos == (nibble & 3), v0, tl.where(pos == (nibble >> 2), v1, tl.zeros_like(v0)))
        acc = tl.dot(xs, w_t, acc, input_precision=PRECISION)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    if GELU:  # exact (erf) GELU, as F.gelu: fused so fc1 -> GELU is one kernel
        acc = 0.5 * acc * (1.0 + tl.math.erf(acc * 0.7071067811865476))
    tl.store(y_ptr + offs_m[:, None] * N + offs_n[None, :], acc.to(y_ptr.dtype.element_ty),
             mask=m_ok[:, None] & n_ok[None, :])


def semi24_linear(x: torch.Tensor, values: torch.Tensor, meta: torch.Tensor,
                  bias: torch.Tensor | None, gelu: bool = False) -> torch.Tensor:
    n = values.shape[0]
    x = check_linear_inputs("semi24_linear_triton", x, values, bias, n, meta=meta)
    m, k = x.shape
    if k % 4 or values.shape[1] * 2 != k:
        raise ValueError(f"semi24_linear_triton: x has K={k}; values must be [N, K/2] with K % 4 == 0, "
                         f"got {tuple(values.shape)}")
    if meta.dtype != torch.int16 or tuple(meta.shape) != (n, -(-k // 16)):
        raise ValueError(f"semi24_linear_triton: meta must be int16 [{n}, {-(-k // 16)}], "
                         f"got {meta.dtype} {tuple(meta.shape)}")
    check_2to4_meta_once(meta, k, name="semi24_linear_triton: meta")
    y = torch.empty((m, n), dtype=x.dtype, device=x.device)
    if m == 0 or n == 0:
        return y

    def grid(meta_):
        return (triton.cdiv(m, meta_["BLOCK_M"]), triton.cdiv(n, meta_["BLOCK_N"]))

    _semi24_kernel[grid](x, values.contiguous(), meta.contiguous(), bias if bias is not None else values, y,
                         m, n, k, meta.shape[1], HAS_BIAS=bias is not None, GELU=gelu, PRECISION=dot_precision(x.dtype))
    return y
