"""kernels/reference.py: the CPU torch.sparse branch of csr/bsr_linear equals the rebuild branch."""

import pytest
import torch

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
@pytest.mark.parametrize("n,k", [(1, 1), (37, 29), (64, 48), (5, 130)])
@pytest.mark.parametrize("m", [1, 7, 300])
@pytest.mark.parametrize("density", [0.0, 0.05, 0.5])
@pytest.mark.parametrize("bias", [True, False])
def test_csr_sparse_branch_matches_rebuild(monkeypatch, dtype, n, k, m, density, bias):
    w, mask = _weight(n, k, density, seed=n * k + m, dtype=dtype, empty_rows=True)
    fmt = F.CSR.from_dense(w, mask)
    x = torch.randn(m, k, dtype=dtype)
    b = torch.randn(n, dtype=dtype) if bias else None
    outs = []
    for wins in (True, False):
        monkeypatch.setattr(reference, "_cpu_sparse_wins", lambda x, d, wins=wins: wins)
        outs.append(reference.csr_linear(x, fmt.values, fmt.crow_indices, fmt.col_indices, n, b))
    tol = 1e-5 if dtype == torch.float32 else 1e-12
    torch.testing.assert_close(outs[0], outs[1], rtol=tol, atol=tol)
    torch.testing.assert_close(outs[1], torch.nn.functional.linear(x, w * mask, b), rtol=tol, atol=tol)
    assert outs[0].is_contiguous() and outs[0].shape == (m, n)


@pytest.mark.parametrize("n,k,block", [(64, 48, (16, 16)), (32, 96, (32, 8)), (30, 20, (16, 16))])
@pytest.mark.parametrize("m", [1, 300])
@pytest.mark.parametrize("bias", [True, False])
def test_bsr_sparse_branch_matches_rebuild(monkeypatch, n, k, block, m, bias):
    w, mask = _weight(n, k, 0.05, seed=m, dtype=torch.float32)
    fmt = F.BSR.from_dense(w, mask, block=block)
    x = torch.randn(m, k)
    b = torch.randn(n) if bias else None
    outs = []
    for wins in (True, False):
        monkeypatch.setattr(reference, "_cpu_sparse_wins", lambda x, d, wins=wins: wins)
        outs.append(reference.bsr_linear(x, fmt.values, fmt.crow_indices, fmt.col_indices, n, b))
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(outs[1], torch.nn.functional.linear(x, w * mask, b), rtol=1e-5, atol=1e-5)


def test_int16_columns_take_the_sparse_branch(monkeypatch):
    w, mask = _weight(40, 300, 0.1, seed=3, dtype=torch.float32)
    fmt = F.CSR.from_dense(w, mask, index_dtype=torch.int16)
    assert fmt.col_indices.dtype == torch.int16
    x = torch.randn(4, 300)
    monkeypatch.setattr(reference, "_cpu_sparse_wins", lambda x, d: True)
    y = reference.csr_linear(x, fmt.values, fmt.crow_indices, fmt.col_indices, 40, None)
    torch.testing.assert_close(y, x @ (w * mask).t(), rtol=1e-5, atol=1e-5)
