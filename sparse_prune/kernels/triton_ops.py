"""The ``triton`` backend: one ``torch.library.custom_op`` per format (``<op>_triton``), with the
public op's arguments in the same order, and its fake from :func:`sparse_prune.kernels.fakes.linear_fake`.

Imported on first use, so ``import sparse_prune`` never needs Triton. These ops are what
``backend="triton"`` forces (and what the interpreter tests run on the CPU); on CUDA the public
ops of :mod:`sparse_prune.ops` call them through :data:`KERNELS` where csrc/ has no kernel.
Annotations are real ``Optional[...]`` objects (no ``from __future__ import annotations``):
older torch (2.11 on the GPU machines) infers custom-op schemas from them. Not ``triton_op``:
that wrapper does not run under the Triton interpreter, which the CPU tests use.
"""

from typing import Optional

import torch

from sparse_prune.kernels import triton_bsr, triton_csr, triton_semi24, triton_shrunk
from sparse_prune.kernels.fakes import linear_fake


@torch.library.custom_op("sparse_prune::csr_linear_triton", mutates_args=())
def csr_linear_triton(x: torch.Tensor, values: torch.Tensor, crow_indices: torch.Tensor,
                      col_indices: torch.Tensor, out_features: int, bias: Optional[torch.Tensor],  # noqa: UP045
                      row_order: Optional[torch.Tensor] = None, gelu: bool = False) -> torch.Tensor:  # noqa: UP045
    return triton_csr.csr_linear(x, values, crow_indices, col_indices, row_order, out_features, bias, gelu)


@csr_linear_triton.register_fake
def _(x, values, crow_indices, col_indices, out_features, bias, row_order=None, gelu=False):
    return linear_fake(x, out_features)


@torch.library.custom_op("sparse_prune::bsr_linear_triton", mutates_args=())
def bsr_linear_triton(x: torch.Tensor, values: torch.Tensor, crow_indices: torch.Tensor,
                      col_indices: torch.Tensor, out_features: int, bias: Optional[torch.Tensor],  # noqa: UP045
                      gelu: bool = False) -> torch.Tensor:
    return triton_bsr.bsr_linear(x, values, crow_indices, col_indices, out_features, bias, gelu)


@bsr_linear_triton.register_fake
def _(x, values, crow_indices, col_indices, out_features, bias, gelu=False):
    return linear_fake(x, out_features)


@torch.library.custom_op("sparse_prune::semi24_linear_triton", mutates_args=())
def semi24_linear_triton(x: torch.Tensor, values: torch.Tensor, meta: torch.Tensor,
                         bias: Optional[torch.Tensor], gelu: bool = False) -> torch.Tensor:  # noqa: UP045
    return triton_semi24.semi24_linear(x, values, meta, bias, gelu)


@semi24_linear_triton.register_fake
def _(x, values, meta, bias, gelu=False):
    return linear_fake(x, values.shape[0])


@torch.library.custom_op("sparse_prune::shrunk_linear_triton", mutates_args=())
def shrunk_linear_triton(x: torch.Tensor, values: torch.Tensor, out_index: torch.Tensor,
                         in_index: torch.Tensor, out_features: int, bias: Optional[torch.Tensor],  # noqa: UP045
                         gelu: bool = False) -> torch.Tensor:
    return triton_shrunk.shrunk_linear(x, values, out_index, in_index, out_features, bias, gelu)


@shrunk_linear_triton.register_fake
def _(x, values, out_index, in_index, out_features, bias, gelu=False):
    return linear_fake(x, out_features)


# format name -> the Triton op, called with the public op's arguments (the public ops have no
# epilogue argument: gelu stays False there)
KERNELS = {
    "csr": csr_linear_triton,
    "bsr": bsr_linear_triton,
    "2:4": semi24_linear_triton,
    "shrink": shrunk_linear_triton,
}
