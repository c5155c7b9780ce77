"""The ``triton`` backend: one ``torch.library.custom_op`` per format, each with a fake kernel.

Imported on first use (``backend="triton"``), so ``import sparse_prune`` never needs Triton.
Annotations are real ``Optional[...]`` objects (no ``from __future__ import annotations``):
older torch (2.11 on the GPU machines) infers custom-op schemas from them.
Op names are the torch backend's with a ``_triton`` suffix and the same arguments. Not
``triton_op``: that wrapper does not run under the Triton interpreter, which the CPU tests use.
"""

from typing import Optional

import torch

from sparse_prune.kernels import triton_bsr, triton_csr, triton_semi24, triton_shrunk


def _fake(x: torch.Tensor, out_features: int) -> torch.Tensor:
    torch._check(x.dim() == 2, lambda: f"x must be 2-D [M, K], got {x.dim()}-D")
    return x.new_empty((x.shape[0], out_features))


@torch.library.custom_op("sparse_prune::csr_linear_triton", mutates_args=())
def csr_linear_triton(x: torch.Tensor, values: torch.Tensor, crow_indices: torch.Tensor,
                      col_indices: torch.Tensor, row_order: torch.Tensor, out_features: int,
                      bias: Optional[torch.Tensor]) -> torch.Tensor:  # noqa: UP045
    return triton_csr.csr_linear(x, values, crow_indices, col_indices, row_order, out_features, bias)


@csr_linear_triton.register_fake
def _(x, values, crow_indices, col_indices, row_order, out_features, bias):
    return _fake(x, out_features)


@torch.library.custom_op("sparse_prune::bsr_linear_triton", mutates_args=())
def bsr_linear_triton(x: torch.Tensor, values: torch.Tensor, crow_indices: torch.Tensor,
                      col_indices: torch.Tensor, out_features: int, bias: Optional[torch.Tensor]) -> torch.Tensor:  # noqa: UP045
    return triton_bsr.bsr_linear(x, values, crow_indices, col_indices, out_features, bias)


@bsr_linear_triton.register_fake
def _(x, values, crow_indices, col_indices, out_features, bias):
    return _fake(x, out_features)


@torch.library.custom_op("sparse_prune::semi24_linear_triton", mutates_args=())
def semi24_linear_triton(x: torch.Tensor, values: torch.Tensor, meta: torch.Tensor,
                         bias: Optional[torch.Tensor]) -> torch.Tensor:  # noqa: UP045
    return triton_semi24.semi24_linear(x, values, meta, bias)


@semi24_linear_triton.register_fake
def _(x, values, meta, bias):
    return _fake(x, values.shape[0])


@torch.library.custom_op("sparse_prune::shrunk_linear_triton", mutates_args=())
def shrunk_linear_triton(x: torch.Tensor, values: torch.Tensor, out_index: torch.Tensor,
                         in_index: torch.Tensor, out_features: int, bias: Optional[torch.Tensor]) -> torch.Tensor:  # noqa: UP045
    return triton_shrunk.shrunk_linear(x, values, out_index, in_index, out_features, bias)


@shrunk_linear_triton.register_fake
def _(x, values, out_index, in_index, out_features, bias):
    return _fake(x, out_features)
