"""kernels/reference.py: the oracle of every linear op is the masked dense product (+ GELU)."""

import pytest
import torch
import torch.nn.functional as Fn

from sparse_prune import formats as F
from sparse_prune.kernels import reference


def _weight(n, k, density, seed, dtype, empty_rows=False):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g, dtype=dtype)
    mask = torch.rand(n, k, generator=g) < density
    if empty_rows:
        mask[::3] = False
    return w, mask


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("n,k", [(1, 1), (37, 29), (5, 130)])
@pytest.mark.parametrize("m", [1, 7])
@pytest.mark.parametrize("gelu", [False, True])
def test_csr_and_bsr_are_the_masked_dense_product(dtype, n, k, m, gelu):
    w, mask = _weight(n, k, 0.3, seed=n * k + m, dtype=dtype, empty_rows=True)
    x = torch.randn(m, k, dtype=dtype)
    b = torch.randn(n, dtype=dtype)
    expected = Fn.linear(x, w * mask, b)
    expected = Fn.gelu(expected) if gelu else expected
    c = F.CSR.from_dense(w, mask)
    got = reference.csr_linear(x, c.values, c.crow_indices, c.col_indices, n, b, None, gelu)
    torch.testing.assert_close(got, expected)
    blk = F.BSR.from_dense(w, mask, block=(4, 8))
    got = reference.bsr_linear(x, blk.values, blk.crow_indices, blk.col_indices, n, b, gelu)
    torch.testing.assert_close(got, expected)


def test_semi24_is_the_decompressed_product():
    w = torch.randn(6, 16)
    mask = torch.zeros(6, 4, 4, dtype=torch.bool)
    mask[..., 1:3] = True
    mask = mask.reshape(6, 16)
    s = F.SemiStructured.from_dense(w, mask)
    x = torch.randn(3, 16)
    torch.testing.assert_close(reference.semi24_linear(x, s.values, s.meta, None, True),
                               Fn.gelu(Fn.linear(x, w * mask)))
