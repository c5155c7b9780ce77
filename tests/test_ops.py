"""The 2:4 compression op: layout, round trip, errors, opcheck; the CUDA kernel on a GPU."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import sparse_prune as sp
from sparse_prune.kernels import reference

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _two_four(rows, cols, dtype=torch.float32, seed=0, keep_fewer=False, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g).to(dtype)
    score = torch.rand(rows, cols // 4, 4, generator=g)
    keep = torch.zeros_like(score, dtype=torch.bool)
    keep.scatter_(-1, score.topk(2, dim=-1).indices, True)
    if keep_fewer:  # some groups keep only one or none
        drop = torch.rand(rows, cols // 4, 4, generator=g) < 0.3
        keep &= ~drop
    return w.to(device), keep.reshape(rows, cols).to(device)


def test_layout_by_hand():
    # group 0 keeps columns 1 and 3, group 1 keeps 0 and 2, group 2 keeps only 2, group 3 none
    w = torch.arange(1.0, 17.0).reshape(1, 16)
    mask = torch.tensor([[0, 1, 0, 1, 1, 0, 1, 0, 0, 0, 1, 0, 0, 0, 0, 0]], dtype=torch.bool)
    values, meta = sp.ops.compress_2to4(w, mask)
    assert values.tolist() == [[2.0, 4.0, 5.0, 7.0, 0.0, 11.0, 0.0, 0.0]]
    # nibbles: g0 = 1 | 3<<2 = 13, g1 = 0 | 2<<2 = 8, g2 = 0 | 2<<2 = 8 (col 0 padded, value 0),
    # g3 = 0 | 1<<2 = 4 (cols 0 and 1 padded)
    expected = 13 | 8 << 4 | 8 << 8 | 4 << 12
    assert meta.dtype == torch.int16 and meta.shape == (1, 1)
    assert int(meta[0, 0]) & 0xFFFF == expected


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows, cols", [(0, 8), (1, 4), (5, 20), (37, 64), (3, 48), (197, 12)])
@pytest.mark.parametrize("keep_fewer", [False, True])
def test_round_trip_exact(dtype, rows, cols, keep_fewer):
    w, mask = _two_four(rows, cols, dtype, keep_fewer=keep_fewer)
    values, meta = sp.ops.compress_2to4(w, mask)
    assert values.shape == (rows, cols // 2) and values.dtype == dtype
    assert meta.shape == (rows, -(-cols // 16))
    dense = sp.ops.decompress_2to4(values, meta, cols)
    expected = torch.where(mask, w, torch.zeros((), dtype=dtype))
    assert torch.equal(dense, expected)
    # two distinct increasing columns per group
    idx = reference.unpack_2to4_indices(meta, cols).view(rows, cols // 4, 2)
    assert (idx[..., 0] < idx[..., 1]).all()


def test_mask_defaults_to_nonzeros():
    w, mask = _two_four(4, 16)
    w = torch.where(mask, w, 0.0)
    v1, m1 = sp.ops.compress_2to4(w)
    v2, m2 = sp.ops.compress_2to4(w, mask)
    assert torch.equal(v1, v2) and torch.equal(m1, m2)


def test_nm_pruner_output_compresses():
    lin = torch.nn.Linear(32, 7)
    mask = sp.prune(lin, "nm")["weight"]
    values, meta = sp.ops.compress_2to4(lin.weight.detach(), mask)
    assert torch.equal(sp.ops.decompress_2to4(values, meta, 32), lin.weight.detach() * mask)


@settings(max_examples=60, deadline=None)
@given(rows=st.integers(1, 9), groups=st.integers(1, 11), seed=st.integers(0, 2**16),
       fewer=st.booleans())
def test_round_trip_property(rows, groups, seed, fewer):
    w, mask = _two_four(rows, groups * 4, seed=seed, keep_fewer=fewer)
    values, meta = sp.ops.compress_2to4(w, mask)
    assert torch.equal(sp.ops.decompress_2to4(values, meta, groups * 4), torch.where(mask, w, 0.0))


def test_not_two_four_names_first_bad_group():
    w, mask = _two_four(4, 16)
    mask[2, 9] = True
    mask[2, 8] = True
    mask[2, 10] = True
    with pytest.raises(ValueError, match=r"row 2, columns 8\.\.11 keep [34] of 4"):
        sp.ops.compress_2to4(w, mask)


@pytest.mark.parametrize(
    "make, exc, words",
    [
        (lambda: (torch.randn(4, 6), None), ValueError, "multiple of 4"),
        (lambda: (torch.randn(2, 4, 4), None), ValueError, "2-D"),
        (lambda: (torch.randn(4, 8).to(torch.int32), None), TypeError, "dtype"),
        (lambda: ([[1.0]], None), TypeError, "torch.Tensor"),
        (lambda: (torch.randn(4, 8), torch.ones(4, 8)), TypeError, "torch.bool"),
        (lambda: (torch.randn(4, 8), torch.ones(4, 4, dtype=torch.bool)), ValueError, "shape"),
        (lambda: (torch.randn(4, 8), torch.ones(4, 8, dtype=torch.bool, device="meta")), ValueError, "meta"),
    ],
)
def test_bad_inputs(make, exc, words):
    w, mask = make()
    with pytest.raises(exc, match=words):
        sp.ops.compress_2to4(w, mask)


def test_bad_backend_and_decompress_args():
    w, mask = _two_four(4, 16)
    with pytest.raises(ValueError, match="backend"):
        sp.ops.compress_2to4(w, mask, backend="triton")
    values, meta = sp.ops.compress_2to4(w, mask)
    with pytest.raises(ValueError, match="cols"):
        sp.ops.decompress_2to4(values, meta, 12)
    with pytest.raises(TypeError, match="int16"):
        sp.ops.decompress_2to4(values, meta.int(), 16)
    if not sp.has_cuda_extension():
        with pytest.raises(ValueError, match="extension"):
            sp.ops.compress_2to4(w, mask, backend="cuda")
    else:
        with pytest.raises(ValueError, match="CUDA tensors"):
            sp.ops.compress_2to4(w, mask, backend="cuda")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_opcheck(dtype):
    w, mask = _two_four(5, 20, dtype)
    torch.library.opcheck(torch.ops.sparse_prune.compress_2to4.default, (w, mask))
    values, meta = sp.ops.compress_2to4(w, mask)
    torch.library.opcheck(torch.ops.sparse_prune.decompress_2to4.default, (values, meta, 20))


def test_compiles_fullgraph():
    w, mask = _two_four(6, 32)
    fn = torch.compile(lambda a, b: torch.ops.sparse_prune.compress_2to4(a, b), fullgraph=True, backend="eager")
    v, m = fn(w, mask)
    v2, m2 = sp.ops.compress_2to4(w, mask)
    assert torch.equal(v, v2) and torch.equal(m, m2)


def test_extension_status_is_reported():
    assert isinstance(sp.has_cuda_extension(), bool)
    assert (sp.extension_error() is None) == sp.has_cuda_extension()


# ----------------------------------------------------------------------------------------
# GPU: the compiled kernel against the reference, bit for bit


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows, cols", [(1, 4), (5, 20), (37, 64), (768, 3072), (197, 12)])
@pytest.mark.parametrize("keep_fewer", [False, True])
def test_cuda_kernel_matches_reference(dtype, rows, cols, keep_fewer):
    assert sp.has_cuda_extension(), sp.extension_error()
    w, mask = _two_four(rows, cols, dtype, keep_fewer=keep_fewer, device="cuda")
    v_ref, m_ref = sp.ops.compress_2to4(w, mask, backend="torch")
    v, m = sp.ops.compress_2to4(w, mask, backend="cuda")
    assert torch.equal(v, v_ref) and torch.equal(m, m_ref)


@pytest.mark.gpu
def test_cuda_kernel_on_side_stream_and_opcheck():
    w, mask = _two_four(64, 128, torch.float16, device="cuda")
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        v, m = sp.ops.compress_2to4(w, mask, backend="cuda")
    stream.synchronize()
    v_ref, m_ref = sp.ops.compress_2to4(w, mask, backend="torch")
    assert torch.equal(v, v_ref) and torch.equal(m, m_ref)
    torch.library.opcheck(torch.ops.sparse_prune.compress_2to4.default, (w, mask))


@pytest.mark.gpu
def test_cuda_empty_and_noncontiguous():
    w, mask = _two_four(0, 16, device="cuda")
    v, m = sp.ops.compress_2to4(w, mask, backend="cuda")
    assert v.shape == (0, 8) and m.shape == (0, 1)
    w, mask = _two_four(32, 16, device="cuda")
    wt, mt = w.t().contiguous().t(), mask.t().contiguous().t()  # same values, column-major
    v, m = sp.ops.compress_2to4(wt, mt, backend="cuda")
    v_ref, m_ref = sp.ops.compress_2to4(w, mask, backend="torch")
    assert torch.equal(v, v_ref) and torch.equal(m, m_ref)


def test_import_survives_a_missing_extension(monkeypatch):
    import importlib

    def fail(name):
        raise ImportError("libcudart.so.13: cannot open shared object file")

    monkeypatch.setattr(importlib, "import_module", fail)
    try:
        sp.ops._load_extension()
        assert not sp.has_cuda_extension()
        assert "libcudart" in sp.extension_error()
        w = torch.randn(2, 8)
        sp.ops.compress_2to4(w, sp.prune(torch.nn.Linear(8, 2), "nm")["weight"])  # reference path
    finally:
        monkeypatch.undo()
        sp.ops._load_extension()


def test_a_stale_extension_is_reported_not_fatal(monkeypatch):
    """A library built for other op schemas must not register (or abort the import)."""
    import types

    from sparse_prune import ops

    calls = []
    stale = types.SimpleNamespace(abi_version=lambda: ops.EXTENSION_ABI - 1, register_kernels=lambda: calls.append(1))
    refusing = types.SimpleNamespace(abi_version=lambda: ops.EXTENSION_ABI,
                                     register_kernels=lambda: (_ for _ in ()).throw(RuntimeError("schema mismatch")))
    saved = ops._EXTENSION_ERROR
    try:
        monkeypatch.setattr(ops.importlib, "import_module", lambda name: stale)
        ops._load_extension()
        assert not ops.has_cuda_extension() and "rebuild" in ops.extension_error() and calls == []
        monkeypatch.setattr(ops.importlib, "import_module", lambda name: refusing)
        ops._load_extension()
        assert "schema mismatch" in ops.extension_error()
    finally:
        ops._EXTENSION_ERROR = saved
