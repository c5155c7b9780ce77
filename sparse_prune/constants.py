"""Constants shared across the package: one home, so modules never disagree on them."""

from __future__ import annotations

import torch

# Backends a user may ask for. "auto" picks per layer and device (sparse_prune.backends).
BACKENDS = ("auto", "torch", "triton", "cuda", "cuda:sm90", "cusparselt")
# What a layer may resolve to: the requested ones, plus "dense" (the masked weight
# materialized once and run through F.linear/cuBLAS, where no sparse kernel fits on a GPU).
RESOLVED_BACKENDS = ("torch", "triton", "cuda", "cuda:sm90", "cusparselt", "dense")

# dtypes the linear kernels take; formats also hold float64 (reference / CPU only).
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
FORMAT_DTYPES = (*FLOAT_DTYPES, torch.float64)

DEFAULT_BSR_BLOCK = (32, 32)
BSR_BLOCK_SIDES = (16, 32, 64)  # Triton's tl.dot needs every side >= 16

CUDA_FORMATS = ("2:4", "csr")  # formats with a csrc/ kernel
# backends that run some formats only (the others run every format)
BACKEND_FORMATS = {"cuda": CUDA_FORMATS, "cuda:sm90": ("2:4",), "cusparselt": ("2:4",)}
MMA_SP_K_STEP = 16  # one mma.sp m16n8k16 step: the CUDA 2:4 kernel needs K % 16 == 0

# cuSPARSELt (torch._cslt_*): fp16/bf16 weights with both sides multiples of 16, dense rows
# padded to multiples of 8 (torch.sparse.semi_structured's constraints for these dtypes).
CUSPARSELT_WEIGHT_MULTIPLE = 16
CUSPARSELT_ROW_MULTIPLE = 8
CUSPARSELT_SEARCH_ROWS = 1576  # the algorithm is searched once, on ViT-B/16 batch-8 tokens
