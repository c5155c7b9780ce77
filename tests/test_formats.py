"""Formats: exact round trips (property-based), byte counts, validation of malformed fields."""

from dataclasses import replace

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from sparse_prune.formats import BSR, CSR, FORMATS, SemiStructured, Shrunk

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _weight(n, k, dtype=torch.float32, seed=0):
    return torch.randn(n, k, generator=torch.Generator().manual_seed(seed)).to(dtype)


def _masked(w, m):
    return torch.where(m, w, torch.zeros((), dtype=w.dtype))


def _mask(kind, n, k, seed=0):
    g = torch.Generator().manual_seed(seed)
    if kind == "zeros":
        return torch.zeros(n, k, dtype=torch.bool)
    if kind == "ones":
        return torch.ones(n, k, dtype=torch.bool)
    if kind == "structured":
        return (torch.rand(n, generator=g) < 0.6)[:, None] & (torch.rand(k, generator=g) < 0.7)[None, :]
    if kind == "2:4":
        score = torch.rand(n, k // 4, 4, generator=g)
        keep = torch.zeros_like(score, dtype=torch.bool).scatter_(-1, score.topk(2, -1).indices, True)
        return keep.reshape(n, k) & (torch.rand(n, k, generator=g) < 0.9)
    mask = torch.rand(n, k, generator=g) < 0.3
    mask[n // 2] = False  # an empty row
    return mask


def _make(fmt, w, m, **kw):
    return FORMATS[fmt].from_dense(w, m, **kw)


MASKS = {"shrink": ["structured", "zeros", "ones"], "2:4": ["2:4", "zeros"],
         "csr": ["random", "zeros", "ones"], "bsr": ["random", "zeros", "ones"]}
CASES = [(f, m) for f, ms in MASKS.items() for m in ms]


@pytest.mark.parametrize("fmt, mask_kind", CASES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n, k", [(1, 8), (5, 12), (37, 64), (197, 20)])
def test_round_trip_exact(fmt, mask_kind, dtype, n, k):
    w = _weight(n, k, dtype)
    m = _mask(mask_kind, n, k)
    f = _make(fmt, w, m)
    f.validate()
    assert f.to_dense().dtype == dtype
    assert torch.equal(f.to_dense(), _masked(w, m))
    assert f.shape == (n, k)


@settings(max_examples=40, deadline=None)
@given(n=st.integers(1, 12), groups=st.integers(1, 6), seed=st.integers(0, 2**16),
       bm=st.sampled_from([1, 2, 3, 16]), bk=st.sampled_from([1, 4, 5, 16]),
       density=st.floats(0.0, 1.0))
def test_round_trip_property(n, groups, seed, bm, bk, density):
    k = groups * 4
    w = _weight(n, k, seed=seed)
    g = torch.Generator().manual_seed(seed)
    m = torch.rand(n, k, generator=g) < density
    for f in (CSR.from_dense(w, m), BSR.from_dense(w, m, block=(bm, bk))):
        f.validate()
        assert torch.equal(f.to_dense(), _masked(w, m))
    s = (torch.rand(n, generator=g) < density)[:, None] & (torch.rand(k, generator=g) < density)[None, :]
    sh = Shrunk.from_dense(w, s, round_to=bm)
    sh.validate()
    assert torch.equal(sh.to_dense(), _masked(w, s))
    two_four = _mask("2:4", n, k, seed) & m
    ss = SemiStructured.from_dense(w, two_four)
    ss.validate()
    assert torch.equal(ss.to_dense(), _masked(w, two_four))


def test_nbytes_counts_every_array():
    w = _weight(64, 64, torch.float16)
    m = _mask("random", 64, 64)
    csr = CSR.from_dense(w, m)
    nnz = int(m.sum())
    assert csr.nbytes == nnz * 2 + 65 * 4 + nnz * 4
    assert CSR.from_dense(w, m, index_dtype=torch.int16).nbytes == nnz * 2 + 65 * 4 + nnz * 2
    bsr = BSR.from_dense(w, m, block=(16, 16))
    nb = bsr.values.shape[0]
    assert bsr.nbytes == nb * 256 * 2 + 5 * 4 + nb * 4
    ss = SemiStructured.from_dense(w, _mask("2:4", 64, 64))
    assert ss.nbytes == 64 * 32 * 2 + 64 * 4 * 2
    sh = Shrunk.from_dense(w, _mask("structured", 64, 64))
    assert sh.nbytes == sh.values.numel() * 2 + (sh.out_index.numel() + sh.in_index.numel()) * 8


def test_bsr_padding_is_stored_and_documented():
    w = _weight(5, 7)
    bsr = BSR.from_dense(w, torch.ones(5, 7, dtype=torch.bool), block=(4, 4))
    assert bsr.padded_shape == (8, 8)
    assert bsr.values.shape == (4, 4, 4)  # every block of the padded 2x2 grid
    assert bsr.values[-1, 1:, :].abs().sum() == 0  # padding rows of the last block are zeros


def test_shrunk_round_to_pads_with_zero_rows():
    m = torch.zeros(20, 12, dtype=torch.bool)
    m[[1, 4, 9], :] = True
    m[:, 10] = False
    sh = Shrunk.from_dense(_weight(20, 12), m, round_to=8)
    assert sh.values.shape == (8, 12)  # 3 rows -> 8; 11 columns -> 16, capped at K = 12
    assert sh.out_index.tolist()[:4] == [0, 1, 2, 3]
    assert torch.equal(sh.to_dense(), _masked(_weight(20, 12), m))
    capped = Shrunk.from_dense(_weight(3, 5), torch.ones(3, 5, dtype=torch.bool), round_to=64)
    assert capped.values.shape == (3, 5)


def test_to_changes_values_dtype_only():
    csr = CSR.from_dense(_weight(6, 8), _mask("random", 6, 8))
    half = csr.to(dtype=torch.float16)
    assert half.values.dtype == torch.float16 and half.crow_indices.dtype == torch.int32
    assert half.dtype == torch.float16 and half.device.type == "cpu"


# ----------------------------------------------------------------------------------------
# Bad input


def test_shrink_rejects_unstructured_mask():
    m = _mask("structured", 8, 8)
    m[m.nonzero()[0].tolist()[0], m.nonzero()[0].tolist()[1]] = False
    with pytest.raises(ValueError, match="not structured"):
        Shrunk.from_dense(_weight(8, 8), m)


def test_two_four_rejects_dense_group():
    m = torch.zeros(3, 8, dtype=torch.bool)
    m[1, 4:7] = True
    with pytest.raises(ValueError, match=r"row 1, columns 4\.\.7"):
        SemiStructured.from_dense(_weight(3, 8), m)


@pytest.mark.parametrize("fmt", list(FORMATS))
def test_from_dense_argument_errors(fmt):
    cls = FORMATS[fmt]
    with pytest.raises(ValueError, match="2-D"):
        cls.from_dense(torch.randn(2, 3, 4))
    with pytest.raises(TypeError, match="dtype"):
        cls.from_dense(torch.ones(4, 8, dtype=torch.int64))
    with pytest.raises(ValueError, match="shape"):
        cls.from_dense(torch.randn(4, 8), torch.ones(4, 4, dtype=torch.bool))
    with pytest.raises(TypeError, match="torch.bool"):
        cls.from_dense(torch.randn(4, 8), torch.ones(4, 8))


@pytest.mark.parametrize("block", [(0, 16), (16,), (16, -1), "16x16", (True, 4), (2.0, 4)])
def test_bsr_bad_block(block):
    with pytest.raises(ValueError, match="block"):
        BSR.from_dense(_weight(4, 8), block=block)


def test_csr_index_dtype_checks():
    with pytest.raises(ValueError, match="index_dtype"):
        CSR.from_dense(_weight(2, 4), index_dtype=torch.int8)
    with pytest.raises(ValueError, match="32767"):
        CSR.from_dense(torch.ones(1, 40000), index_dtype=torch.int16)


def _csr():
    return CSR.from_dense(_weight(6, 10), _mask("random", 6, 10, seed=3))


@pytest.mark.parametrize(
    "change, field",
    [
        (lambda f: replace(f, crow_indices=f.crow_indices[:-1]), "crow_indices"),
        (lambda f: replace(f, crow_indices=f.crow_indices + 1), "crow_indices"),
        (lambda f: replace(f, crow_indices=f.crow_indices.flip(0)), "crow_indices"),
        (lambda f: replace(f, crow_indices=f.crow_indices.float()), "crow_indices"),
        (lambda f: replace(f, col_indices=f.col_indices + 10), "col_indices"),
        (lambda f: replace(f, col_indices=f.col_indices.flip(0)), "col_indices"),
        (lambda f: replace(f, values=f.values[:-1]), "crow_indices"),
        (lambda f: replace(f, values=f.values[:, None]), "values"),
    ],
)
def test_csr_malformed(change, field):
    with pytest.raises(ValueError, match=field):
        change(_csr()).validate()


def _bsr():
    return BSR.from_dense(_weight(8, 12), _mask("random", 8, 12, seed=5), block=(4, 4))


@pytest.mark.parametrize(
    "change, field",
    [
        (lambda f: replace(f, crow_indices=f.crow_indices[:-1]), "crow_indices"),
        (lambda f: replace(f, col_indices=f.col_indices + 3), "col_indices"),
        (lambda f: replace(f, col_indices=f.col_indices.flip(0)), "col_indices"),
        (lambda f: replace(f, values=f.values[:, :2]), "values"),
        (lambda f: replace(f, block=(0, 4)), "block"),
    ],
)
def test_bsr_malformed(change, field):
    with pytest.raises(ValueError, match=field):
        change(_bsr()).validate()


def test_shrunk_and_semistructured_malformed():
    sh = Shrunk.from_dense(_weight(6, 6), _mask("structured", 6, 6, seed=1))
    with pytest.raises(ValueError, match="out_index"):
        replace(sh, out_index=sh.out_index + 100).validate()
    with pytest.raises(ValueError, match="in_index"):
        replace(sh, in_index=sh.in_index.flip(0)).validate()
    with pytest.raises(ValueError, match="values"):
        replace(sh, values=sh.values[:, :0]).validate()
    ss = SemiStructured.from_dense(_weight(4, 16), _mask("2:4", 4, 16))
    with pytest.raises(ValueError, match="meta"):
        replace(ss, meta=ss.meta.int()).validate()
    with pytest.raises(ValueError, match="meta"):
        replace(ss, meta=torch.zeros_like(ss.meta)).validate()  # index pair (0, 0) is invalid
    with pytest.raises(ValueError, match="values"):
        replace(ss, values=ss.values[:, :4]).validate()


def test_csr_row_order_is_longest_first_and_stable():
    mask = torch.tensor([[1, 0, 0, 0], [1, 1, 1, 0], [0, 0, 0, 0], [1, 1, 0, 0], [1, 0, 1, 1]], dtype=torch.bool)
    order = CSR.from_dense(torch.randn(5, 4), mask).row_order()
    assert order.dtype == torch.int32 and order.tolist() == [1, 4, 3, 0, 2]
