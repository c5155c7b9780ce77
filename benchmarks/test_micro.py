"""CPU micro-benchmarks (pytest-benchmark) of each linear op, reference vs Triton paths.

Not part of ``make test``. Run: ``make micro`` (= ``.venv/bin/pytest benchmarks/test_micro.py
--benchmark-only``). Without a GPU the Triton kernels run in the interpreter, so their rows
measure the interpreter, not the kernel: they are here to catch regressions in the Python
overhead and to be compared on a GPU machine, where the same file times the real kernels: there
every timed call ends with ``torch.cuda.synchronize()`` (:func:`_synced`), so a row is the
kernel's time and not the time to enqueue its launch.
"""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before Triton is imported

import sparse_prune as sp  # noqa: E402
from sparse_prune import formats as F  # noqa: E402
from sparse_prune.kernels import reference  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
N, K = 768, 768
ROWS = [197, 1576]


def _synced(fn):
    """``fn`` followed by a device synchronization on CUDA (kernel launches are asynchronous:
    without it pytest-benchmark would time the launch); ``fn`` itself on the CPU."""
    if DEVICE != "cuda":
        return fn

    def run(*args, **kwargs):
        out = fn(*args, **kwargs)
        torch.cuda.synchronize()
        return out

    torch.cuda.synchronize()  # the inputs' copies are done before the first timed call
    return run


def _weights(kind):
    torch.manual_seed(0)
    w = torch.randn(N, K)
    if kind == "2:4":
        mask = sp.prune(torch.nn.Sequential(torch.nn.Linear(K, N)), "nm")["0.weight"]
        return w, mask, F.SemiStructured.from_dense(w, mask)
    if kind == "shrink":
        mask = (torch.rand(N, 1) < 0.5) & (torch.rand(1, K) < 0.5)
        return w, mask, F.Shrunk.from_dense(w, mask)
    mask = torch.rand(N, K) < 0.1
    return w, mask, (F.CSR.from_dense(w, mask) if kind == "csr" else F.BSR.from_dense(w, mask, block=(32, 32)))


def _args(kind, fmt):
    if kind == "2:4":
        return (fmt.values, fmt.meta)
    if kind == "shrink":
        return (fmt.values, fmt.out_index, fmt.in_index, N)
    return (fmt.values, fmt.crow_indices, fmt.col_indices, N)


@pytest.mark.parametrize("rows", ROWS)
def test_dense_linear(benchmark, rows):
    x, w = torch.randn(rows, K, device=DEVICE), torch.randn(N, K, device=DEVICE)
    benchmark(_synced(torch.nn.functional.linear), x, w)


@pytest.mark.parametrize("rows", ROWS)
@pytest.mark.parametrize("kind", ["csr", "bsr", "2:4", "shrink"])
def test_reference(benchmark, kind, rows):
    _, _, fmt = _weights(kind)
    fmt = fmt.to(DEVICE)
    fn = {"csr": reference.csr_linear, "bsr": reference.bsr_linear, "2:4": reference.semi24_linear,
          "shrink": reference.shrunk_linear}[kind]
    benchmark(_synced(fn), torch.randn(rows, K, device=DEVICE), *_args(kind, fmt), None)


@pytest.mark.parametrize("rows", ROWS[:1])
@pytest.mark.parametrize("kind", ["csr", "bsr", "2:4", "shrink"])
def test_triton(benchmark, kind, rows):
    import sparse_prune.kernels.triton_ops  # noqa: F401

    _, _, fmt = _weights(kind)
    fmt = fmt.to(DEVICE)
    op = {"csr": "csr_linear_triton", "bsr": "bsr_linear_triton", "2:4": "semi24_linear_triton",
          "shrink": "shrunk_linear_triton"}[kind]
    args = (*_args(kind, fmt), None)  # bias
    if kind == "csr":  # the GPU CSR kernels take the row schedule SparseLinear precomputes
        args = (*args, fmt.row_order())
    benchmark.pedantic(_synced(getattr(torch.ops.sparse_prune, op)), args=(torch.randn(rows, K, device=DEVICE), *args),
                       rounds=3, warmup_rounds=1)
