"""Our CPU kernels (csrc/cpu/, sparse_prune._C_cpu) behind the public csr/bsr/2:4 ops.

Against the fp64 masked-dense oracle (the agreement rule), on odd shapes, every ISA the CPU has
(AVX-512, AVX2 and the portable path, each forced with SPARSE_PRUNE_CPU_ISA), 1 and 2 threads (bitwise equal: rows never
change their summation order with the split), every dtype, fused bias + GELU, non-finite
inputs, malformed indices, opcheck, torch.compile and torch.export.
"""

import pytest
import torch
import torch.nn.functional as Fn

from sparse_prune import agreement, ops
from sparse_prune import formats as F

pytestmark = pytest.mark.skipif(not ops.has_cpu_extension(),
                                reason=f"CPU kernels not built: {ops.cpu_extension_error()}")

ISAS = ["avx512", "avx2", "portable"]
# every block width with a body of its own (1, 4, 8, 16, 32: spmm_x86_common.h's bsr_seg) in the
# four-row pass and the one-row rest ((6, 8), (5, 4), (6, 16): one pass and rows alone), and the
# generic body ((3, 5), (5, 5)). Blocks of 1-3 rows take the segment layout unless it is off
# (test_bsr_matches_reference runs both).
BLOCKS = [(1, 4), (4, 1), (8, 1), (1, 8), (16, 1), (4, 4), (16, 16), (32, 32), (3, 5), (6, 8), (5, 32), (5, 4),
          (6, 16), (5, 5)]
SHAPES = [(0, 8, 16), (1, 1, 1), (5, 123, 20), (5, 7, 123), (197, 64, 48), (37, 200, 36), (9, 1, 64)]


@pytest.fixture(params=ISAS)
def isa(request, monkeypatch):
    if request.param not in ops.cpu_isas():
        pytest.skip(f"this CPU (or build) cannot run {request.param}")
    monkeypatch.setenv("SPARSE_PRUNE_CPU_ISA", request.param)
    assert ops.cpu_isa() == request.param
    return request.param


def _problem(m, n, k, density, dtype=torch.float32, seed=0, empty_rows=True):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g).to(dtype)
    mask = torch.rand(n, k, generator=g) < density
    if empty_rows and n > 2:
        mask[1] = False          # an empty row
        mask[:, k // 2] = False  # an all-zero column
    x = torch.randn(m, k, generator=g).to(dtype)
    b = torch.randn(n, generator=g).to(dtype)
    return w, mask, x, b


def _two_four(w, seed=0):
    n, k = w.shape
    score = torch.rand(n, k // 4, 4, generator=torch.Generator().manual_seed(seed))
    keep = torch.zeros_like(score, dtype=torch.bool)
    keep.scatter_(-1, score.topk(2, dim=-1).indices, True)
    return keep.reshape(n, k)


def _run(fmt, x, b, gelu=False):
    n = fmt.shape[0]
    if isinstance(fmt, F.CSR):
        return torch.ops.sparse_prune.csr_linear(x, fmt.values, fmt.crow_indices, fmt.col_indices, n, b,
                                                     None, gelu)
    if isinstance(fmt, F.BSR):
        return torch.ops.sparse_prune.bsr_linear(x, fmt.values, fmt.crow_indices, fmt.col_indices, n, b, gelu)
    return torch.ops.sparse_prune.semi24_linear(x, fmt.values, fmt.meta, b, gelu)


def _check(fmt, x, b, gelu=False):
    """The kernel's output against the fp64 masked dense model, allowance from the same-dtype one
    (the agreement rule). With ``gelu`` in float32/64, the product is checked that way and the
    fused GELU against F.gelu of the kernel's own product (elementwise: on a handful of outputs
    the rule's norm would mostly measure which side's rounding got lucky)."""
    got = _run(fmt, x, b, gelu)
    dense = fmt.to_dense()
    bias64 = None if b is None else b.double()
    ref = Fn.linear(x.double(), dense.double(), bias64)
    assert got.shape == ref.shape and got.dtype == x.dtype
    if not got.numel():
        return got
    if gelu and x.dtype in (torch.float32, torch.float64):
        pre = _run(fmt, x, b, False)
        agreement.check_matches(pre, ref, Fn.linear(x, dense, b))
        want = Fn.gelu(pre.double())
        tol = 1e-6 if x.dtype == torch.float32 else 1e-13
        torch.testing.assert_close(got.double(), want, rtol=tol, atol=tol * float(pre.abs().max()))
    else:
        act = Fn.gelu if gelu else (lambda t: t)
        agreement.check_matches(got, act(ref), act(Fn.linear(x, dense, b)))
    return got


@pytest.mark.parametrize("m, n, k", SHAPES)
@pytest.mark.parametrize("density", [0.1, 0.5, 1.0])
@pytest.mark.parametrize("gelu", [False, True])
def test_csr_matches_reference(isa, no_reference, m, n, k, density, gelu):
    w, mask, x, b = _problem(m, n, k, density)
    _check(F.CSR.from_dense(w, mask), x, b, gelu)


@pytest.mark.parametrize("index_dtype", [torch.int16, torch.int32])
def test_csr_index_dtypes_and_no_bias(isa, no_reference, index_dtype):
    w, mask, x, _ = _problem(41, 33, 77, 0.3)
    fmt = F.CSR.from_dense(w, mask, index_dtype=index_dtype)
    _check(fmt, x, None)
    # int64 indices (e.g. a state dict written by other code) are read as they are
    wide = F.CSR(fmt.values, fmt.crow_indices.long(), fmt.col_indices.long(), fmt.shape)
    assert torch.equal(_run(wide, x, None), _run(fmt, x, None))


@pytest.mark.parametrize("block", BLOCKS)
@pytest.mark.parametrize("m, n, k", [(5, 123, 20), (197, 64, 48), (1, 37, 29), (40, 32, 64)])
def test_bsr_matches_reference(isa, no_reference, csr_path, block, m, n, k):
    w, mask, x, b = _problem(m, n, k, 0.2)
    _check(F.BSR.from_dense(w, mask, block=block), x, b, gelu=block == (4, 1))


# fc2's K with the benchmark's scales (W / sqrt(K), bias / 10), dense blocks at 70% sparsity:
# each row's K-blocks are summed apart and then added (one chain through the ~920 terms of a
# row came out at 1.23e-6 against the rule's 1.21e-6 end to end, ViT-B/16 batch 8, AVX-512).
# (6, 1): four rows at once and two alone in each block row.
@pytest.mark.parametrize("block", [(16, 1), (4, 4), (1, 4), (3, 1), (6, 1)])
def test_bsr_long_rows_match_reference(isa, no_reference, block):
    g = torch.Generator().manual_seed(5)
    n, k = 48, 3072
    w = torch.randn(n, k, generator=g) * k ** -0.5
    keep = torch.rand(n // block[0], k // block[1], generator=g) < 0.3
    mask = keep.repeat_interleave(block[0], 0).repeat_interleave(block[1], 1)
    x = torch.randn(197, k, generator=g)
    b = torch.randn(n, generator=g) * 0.1
    fmt = F.BSR.from_dense(w, mask, block=block)
    one = _threads(1, lambda: _check(fmt, x, b))
    assert torch.equal(one, _threads(2, lambda: _run(fmt, x, b, False)))


@pytest.mark.parametrize("m, n, k", [(0, 8, 16), (1, 1, 4), (5, 123, 20), (197, 64, 48), (37, 9, 132)])
@pytest.mark.parametrize("gelu", [False, True])
def test_semi24_matches_reference(isa, no_reference, m, n, k, gelu):
    w, _, x, b = _problem(m, n, k, 1.0, empty_rows=False)
    mask = _two_four(w)
    mask[0, :4] = False  # a group that keeps nothing (padded with stored zeros)
    _check(F.SemiStructured.from_dense(w, mask), x, b, gelu)


def test_large_m_both_isas_agree(no_reference, monkeypatch):
    """M = 1576 (ViT-B/16 batch 8): many 48-token tiles and a partial last one."""
    w, mask, x, b = _problem(1576, 96, 200, 0.3)
    fmt = F.CSR.from_dense(w, mask)
    outs = {}
    for isa in ops.cpu_isas():
        monkeypatch.setenv("SPARSE_PRUNE_CPU_ISA", isa)
        outs[isa] = _check(fmt, x, b)
    for isa, out in outs.items():
        torch.testing.assert_close(out, outs["portable"], rtol=1e-5, atol=1e-5, msg=isa)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("kind", ["csr", "bsr", "2:4"])
def test_other_dtypes(no_reference, dtype, kind):
    """float64 runs the portable path in float64; float16/bfloat16 compute in float32."""
    w, mask, x, b = _problem(197, 48, 64, 0.4, dtype=dtype, empty_rows=False)
    fmt = (F.CSR.from_dense(w, mask) if kind == "csr" else F.BSR.from_dense(w, mask, block=(4, 1))
           if kind == "bsr" else F.SemiStructured.from_dense(w, _two_four(w)))
    _check(fmt, x, b, gelu=True)


@pytest.mark.parametrize("kind", ["csr", "bsr", "2:4"])
def test_threads_split_rows_bitwise_equal(isa, kind):
    w, mask, x, b = _problem(197, 300, 96, 0.3, empty_rows=False)
    fmt = (F.CSR.from_dense(w, mask) if kind == "csr" else F.BSR.from_dense(w, mask, block=(8, 1))
           if kind == "bsr" else F.SemiStructured.from_dense(w, _two_four(w)))
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = _run(fmt, x, b, True)
        torch.set_num_threads(2)
        two = _run(fmt, x, b, True)
    finally:
        torch.set_num_threads(before)
    assert torch.equal(one, two)


def _kind_format(kind, w, mask, block=(8, 1)):
    return (F.CSR.from_dense(w, mask) if kind == "csr" else F.BSR.from_dense(w, mask, block=block)
            if kind == "bsr" else F.SemiStructured.from_dense(w, _two_four(w)))


def _threads(n, fn):
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(n)
        return fn()
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("split", ["rows", "tokens", "auto"])
@pytest.mark.parametrize("kind, block", [("csr", None), ("bsr", (8, 1)), ("bsr", (3, 5)), ("2:4", None)])
@pytest.mark.parametrize("m", [197, 531])
def test_token_and_row_splits_bitwise_equal_to_one_thread(isa, no_reference, monkeypatch, split, kind, block, m):
    """Workers take whole token tiles (their own panels and rows of Y) or ranges of rows; either
    way every output is summed as on one thread."""
    # K = 101: a bsr (3, 5) block overhangs K (padding); 2:4's K = 100 ends in a partial metadata word
    w, mask, x, b = _problem(m, 300, 101 if kind != "2:4" else 100, 0.3)
    fmt = _kind_format(kind, w, mask, block)
    one = _threads(1, lambda: _run(fmt, x, b, True))
    monkeypatch.setenv("SPARSE_PRUNE_CPU_SPLIT", split)
    two = _threads(2, lambda: _check(fmt, x, b, True))
    assert torch.equal(one, two)


@pytest.fixture(params=["1", "0"], ids=["segments", "row-loop"])
def csr_path(request, monkeypatch):
    """float32 csr through the segment layout (default) or the row-by-row loop."""
    monkeypatch.setenv("SPARSE_PRUNE_CPU_SEGMENTS", request.param)
    return request.param


def _segment_cache_size():
    from sparse_prune import _C_cpu
    return _C_cpu.segment_cache_size()


# several 256-row blocks (a partial last one), several column sub-blocks (96 or 64 wide here, a
# partial last one), very sparse rows (sub-blocks with no segment but the first), 1576 tokens;
# K above the rows (sub-blocks outer in the segment kernel) and below them (row blocks outer);
# N = 768 (4 row blocks of 192: a tile cut between the two workers at half of them).
# (5, 513, 600, 0.5): with K = 1000 the portable path's one-accumulator sums of ~500 terms (both
# loops) came out at 4.0e-7 against the rule's 3.6e-7.
@pytest.mark.parametrize("m, n, k, density", [(197, 300, 700, 0.1), (5, 513, 600, 0.5), (1576, 257, 300, 0.3),
                                              (33, 600, 260, 0.02), (1, 1, 1, 1.0), (197, 768, 200, 0.3)])
@pytest.mark.parametrize("split", ["rows", "tokens"])
def test_csr_paths_match_reference_and_one_thread(isa, no_reference, csr_path, monkeypatch, m, n, k, density, split):
    w, mask, x, b = _problem(m, n, k, density)
    fmt = F.CSR.from_dense(w, mask)
    one = _threads(1, lambda: _check(fmt, x, b, True))
    monkeypatch.setenv("SPARSE_PRUNE_CPU_SPLIT", split)
    two = _threads(2, lambda: _check(fmt, x, b, True))
    assert torch.equal(one, two)


# (197, 64, 3072): fc2's K with the benchmark's scales (W / sqrt(K), bias / 10); the row loop's
# one chain per row through 1,536 terms came out at 1.012x the agreement rule's allowance here
# (AVX2; 5.04e-7 against 5.01e-7 in the per-GEMM benchmark), 0.35x with each K-block summed
# from zero. (5, 300, 520): two row blocks, a partial last sub-block; a group that keeps nothing
# in every case.
@pytest.mark.parametrize("m, n, k", [(197, 64, 3072), (5, 300, 520), (1576, 40, 132), (1, 1, 4)])
@pytest.mark.parametrize("split", ["rows", "tokens"])
def test_semi24_paths_match_reference_and_one_thread(isa, no_reference, csr_path, monkeypatch, m, n, k, split):
    w, _, x, b = _problem(m, n, k, 1.0, empty_rows=False)
    w, b = w * k ** -0.5, b * 0.1
    mask = _two_four(w)
    mask[0, :4] = False
    fmt = F.SemiStructured.from_dense(w, mask)
    ops.clear_cpu_cache()
    one = _threads(1, lambda: _check(fmt, x, b, True))
    assert _segment_cache_size() == (csr_path == "1")  # the layout took it
    monkeypatch.setenv("SPARSE_PRUNE_CPU_SPLIT", split)
    two = _threads(2, lambda: _check(fmt, x, b, True))
    assert torch.equal(one, two)


# Rows built to reach every branch of the segment kernel (segments.cpp pairs them): identical
# rows (every column shared), complementary rows (none shared), a full row (a long tail against
# any partner), an odd row count (a lone row), dense sub-blocks (paired by shared columns) and
# sparse ones (paired by length) in one weight, and tiles of 1, 2, 3 and 5 vectors (AVX2).
@pytest.mark.parametrize("m", [1, 9, 16, 24, 40, 197])
def test_segment_pairs_reach_every_branch(isa, no_reference, monkeypatch, m):
    monkeypatch.setenv("SPARSE_PRUNE_CPU_SEGMENTS", "1")
    n, k = 37, 400
    g = torch.Generator().manual_seed(3)
    w = torch.randn(n, k, generator=g) * k ** -0.5
    mask = torch.rand(n, k, generator=g) < 0.5
    mask[:, 200:] = torch.rand(n, 200, generator=g) < 0.05
    mask[3] = mask[2]
    mask[4] = torch.arange(k) % 2 == 0
    mask[5] = ~mask[4]
    mask[6] = True
    mask[7, 100:] = False
    x = torch.randn(m, k, generator=g)
    b = torch.randn(n, generator=g) * 0.1
    fmt = F.CSR.from_dense(w, mask)
    ops.clear_cpu_cache()
    one = _threads(1, lambda: _check(fmt, x, b, True))
    assert _segment_cache_size() == 1
    two = _threads(2, lambda: _check(fmt, x, b, True))
    assert torch.equal(one, two)


def test_semi24_layout_follows_in_place_changes_and_checks_meta(no_reference, monkeypatch):
    """The 2:4 layout is cached on values and meta: an in-place change to either builds it again,
    and meta is checked on every build (a bad word written in place is refused)."""
    monkeypatch.setenv("SPARSE_PRUNE_CPU_SEGMENTS", "1")
    w, _, x, b = _problem(37, 70, 200, 1.0, empty_rows=False)
    fmt = F.SemiStructured.from_dense(w, _two_four(w))
    first = _check(fmt, x, b)
    size = _segment_cache_size()
    assert torch.equal(_run(fmt, x, b), first) and _segment_cache_size() == size
    with torch.no_grad():
        fmt.values.mul_(-2.0)
    changed = _check(fmt, x, b)
    assert not torch.equal(changed, first) and _segment_cache_size() == size
    other = F.SemiStructured.from_dense(w, _two_four(w, seed=1))
    fmt.meta.copy_(other.meta)  # same values, another pattern: rebuilt from the new meta
    _check(fmt, x, b)
    fmt.meta[3, 2] = 0  # nibbles 0000: refused, not served from the cache
    with pytest.raises(ValueError, match="meta"):
        _run(fmt, x, b)


def test_segment_layout_follows_in_place_changes(no_reference, monkeypatch):
    """The layout is cached on the weight tensors: reused while they are unchanged, built again
    after an in-place change (version counter) or for new tensors, dropped with them."""
    monkeypatch.setenv("SPARSE_PRUNE_CPU_SEGMENTS", "1")
    w, mask, x, b = _problem(37, 300, 200, 0.2)
    fmt = F.CSR.from_dense(w, mask)
    first = _check(fmt, x, b)
    size = _segment_cache_size()
    assert torch.equal(_run(fmt, x, b), first) and _segment_cache_size() == size  # reused
    with torch.no_grad():
        fmt.values.mul_(-2.0)  # in place: same tensor, new version
    changed = _check(fmt, x, b)
    assert not torch.equal(changed, first) and _segment_cache_size() == size  # rebuilt, replaced
    fmt.col_indices[0] = fmt.col_indices[0]  # an in-place write to the indices also counts
    assert torch.equal(_run(fmt, x, b), changed)
    other = F.CSR.from_dense(w, mask)  # equal contents, new tensors: an entry of its own
    assert torch.equal(_run(other, x, b), first)
    assert _segment_cache_size() == size + 1
    del other
    _run(F.CSR.from_dense(w[:5], mask[:5]), x, b[:5])  # an insert drops the freed weight's entry
    assert _segment_cache_size() <= size + 1


@pytest.mark.parametrize("block", [(1, 4), (2, 8), (3, 5), (1, 1)])
def test_bsr_short_blocks_take_the_segment_layout(isa, no_reference, monkeypatch, block):
    """Blocks of fewer than 4 rows run as csr through the segment layout (segments.h:
    bsr_segments), cached on the bsr tensors: built once, rebuilt after an in-place change, the
    block columns and the padding past K checked on every build; 1 and 2 threads agree bitwise.
    K = 203 and N = 70: the last block column and block row overhang the weight."""
    monkeypatch.setenv("SPARSE_PRUNE_CPU_SEGMENTS", "1")
    w, mask, x, b = _problem(197, 70, 203, 0.3)
    fmt = F.BSR.from_dense(w, mask, block=block)
    ops.clear_cpu_cache()
    one = _threads(1, lambda: _check(fmt, x, b, True))
    assert _segment_cache_size() == 1
    assert torch.equal(_threads(2, lambda: _check(fmt, x, b, True)), one) and _segment_cache_size() == 1
    with torch.no_grad():
        fmt.values.mul_(-2.0)
    assert not torch.equal(_check(fmt, x, b, True), one) and _segment_cache_size() == 1
    col = fmt.col_indices.clone()
    row = int((fmt.crow_indices[1:] - fmt.crow_indices[:-1]).argmax())  # a block row with >= 2 blocks
    first = int(fmt.crow_indices[row])
    col[first], col[first + 1] = col[first + 1].clone(), col[first].clone()
    with pytest.raises(ValueError, match="strictly increasing"):
        torch.ops.sparse_prune.bsr_linear(x, fmt.values, fmt.crow_indices, col, 70, b)
    got = _check(fmt, x, b)
    for dtype in (torch.int16, torch.int64):  # the layout reads every index width
        same = torch.ops.sparse_prune.bsr_linear(x, fmt.values, fmt.crow_indices, fmt.col_indices.to(dtype), 70, b)
        assert torch.equal(same, got)
    if block[1] > 1 and 203 % block[1]:
        values = fmt.values.clone()
        last = int((fmt.col_indices == 203 // block[1]).nonzero().max())
        values[last, :, -1] = 1.0
        with pytest.raises(ValueError, match="padding"):
            torch.ops.sparse_prune.bsr_linear(x, values, fmt.crow_indices, fmt.col_indices, 70, b)


def test_bsr_tall_blocks_keep_the_four_row_pass(no_reference, monkeypatch):
    monkeypatch.setenv("SPARSE_PRUNE_CPU_SEGMENTS", "1")
    w, mask, x, b = _problem(40, 64, 48, 0.3)
    ops.clear_cpu_cache()
    _check(F.BSR.from_dense(w, mask, block=(4, 1)), x, b)
    assert _segment_cache_size() == 0


@pytest.mark.parametrize("block", [(4, 1), (4, 4), (5, 8), (8, 16), (6, 32), (4, 3)])
def test_bsr_tall_blocks_read_every_index_width(isa, no_reference, block):
    """int32 block columns take a body with the block width a constant (1, 4, 8, 16, 32), int16
    and int64 ones the generic body: all three agree with the reference and with each other.
    M = 37 (a partial tile), K = 203 and N = 70 (overhanging edge blocks)."""
    w, mask, x, b = _problem(37, 70, 203, 0.3)
    fmt = F.BSR.from_dense(w, mask, block=block)
    got = _check(fmt, x, b, True)
    for dtype in (torch.int16, torch.int64):
        other = torch.ops.sparse_prune.bsr_linear(x, fmt.values, fmt.crow_indices, fmt.col_indices.to(dtype),
                                                  70, b, True)
        torch.testing.assert_close(other, got, rtol=1e-6, atol=1e-5)


def test_clear_cpu_cache_sees_changes_behind_the_version_counter(no_reference, monkeypatch):
    monkeypatch.setenv("SPARSE_PRUNE_CPU_SEGMENTS", "1")
    w, mask, x, b = _problem(37, 300, 200, 0.2)
    fmt = F.CSR.from_dense(w, mask)
    first = _check(fmt, x, b)
    fmt.values.data.mul_(-2.0)  # .data: the version counter does not move
    assert torch.equal(_run(fmt, x, b), first)  # the stale layout, as documented
    ops.clear_cpu_cache()
    assert _segment_cache_size() == 0
    assert not torch.equal(_check(fmt, x, b), first)


def test_inference_tensors_take_the_row_loop(no_reference, monkeypatch):
    """Weights made under inference_mode have no version counter: never cached, still right."""
    monkeypatch.setenv("SPARSE_PRUNE_CPU_SEGMENTS", "1")
    w, mask, x, b = _problem(37, 300, 200, 0.2)
    with torch.inference_mode():
        fmt = F.CSR.from_dense(w, mask)
        size = _segment_cache_size()
        _check(fmt, x, b)
        assert _segment_cache_size() == size


def test_segments_switch_refuses_unknown(monkeypatch):
    monkeypatch.setenv("SPARSE_PRUNE_CPU_SEGMENTS", "yes")
    w, mask, x, b = _problem(5, 8, 16, 0.5)
    with pytest.raises(ValueError, match="SPARSE_PRUNE_CPU_SEGMENTS must be 0 or 1"):
        _run(F.CSR.from_dense(w, mask), x, b)


def test_layout_knobs_build_their_own_layouts_and_refuse_bad_values(no_reference, monkeypatch):
    """SPARSE_PRUNE_CPU_SPAN / _SEGMENT_ROWS (tuning knobs) give the same products; bad values raise."""
    w, mask, x, b = _problem(37, 300, 200, 0.2)
    fmt = F.CSR.from_dense(w, mask)
    first = _check(fmt, x, b)
    monkeypatch.setenv("SPARSE_PRUNE_CPU_SPAN", "16")
    monkeypatch.setenv("SPARSE_PRUNE_CPU_SEGMENT_ROWS", "7")
    torch.testing.assert_close(_check(fmt, x, b), first, rtol=1e-5, atol=1e-5)
    monkeypatch.setenv("SPARSE_PRUNE_CPU_SEGMENT_ROWS", "0")
    with pytest.raises(ValueError, match="SPARSE_PRUNE_CPU_SEGMENT_ROWS"):
        _run(fmt, x, b)


@pytest.mark.parametrize("kind", ["csr", "bsr", "bsr padding", "2:4"])
def test_token_split_checks_every_row(isa, monkeypatch, kind):
    """The index pass runs once, split by rows, before any product: a bad index (or nonzero bsr
    padding) near the last row (the second worker's) still raises. M = 600 keeps every kind
    above the one-worker threshold (1 MFLOP), so the token split is the path taken."""
    monkeypatch.setenv("SPARSE_PRUNE_CPU_SPLIT", "tokens")
    w, mask, x, b = _problem(600, 64, 48, 0.5)
    fmt = _kind_format(kind.split()[0], w, mask, (3, 5) if kind == "bsr padding" else (4, 1))
    good = _threads(1, lambda: _run(fmt, x, b))
    assert torch.equal(_threads(2, lambda: _run(fmt, x, b)), good)  # the same shape, unharmed
    if kind == "csr":
        col = fmt.col_indices.clone()
        col[-1] = 48
        call = lambda: torch.ops.sparse_prune.csr_linear(x, fmt.values, fmt.crow_indices, col, 64, b)  # noqa: E731
    elif kind == "bsr":
        col = fmt.col_indices.clone()
        col[-1] = 10**4
        call = lambda: torch.ops.sparse_prune.bsr_linear(x, fmt.values, fmt.crow_indices, col, 64, b)  # noqa: E731
    elif kind == "bsr padding":
        values = fmt.values.clone()
        last = int((fmt.col_indices == 48 // 5).nonzero().max())  # a block of the last block column (48..49 pad)
        values[last, :, -1] = 1.0
        call = lambda: torch.ops.sparse_prune.bsr_linear(x, values, fmt.crow_indices, fmt.col_indices, 64, b)  # noqa: E731
    else:
        meta = fmt.meta.clone()
        meta[-1, -1] = 0
        call = lambda: torch.ops.sparse_prune.semi24_linear(x, fmt.values, meta, b)  # noqa: E731
    with pytest.raises(ValueError, match="col_indices|meta|padding"):
        _threads(2, call)


def test_split_switch_refuses_unknown(monkeypatch):
    monkeypatch.setenv("SPARSE_PRUNE_CPU_SPLIT", "diagonal")
    w, mask, x, b = _problem(5, 8, 16, 0.5)
    with pytest.raises(ValueError, match="SPARSE_PRUNE_CPU_SPLIT"):
        _run(F.CSR.from_dense(w, mask), x, b)


@pytest.mark.parametrize("kind", ["csr", "bsr", "2:4"])
def test_non_finite_inputs(isa, kind):
    """Lower bound: an output that a kept weight connects to a NaN/inf input is not finite.
    Upper bound: an output with no stored weight on that input column stays finite (the kernels
    skip what is not stored; masked dense would spread the NaN through 0·NaN)."""
    w, mask, x, b = _problem(20, 64, 48, 0.3, empty_rows=False)
    if kind == "2:4":
        mask = _two_four(w)
    fmt = (F.CSR.from_dense(w, mask) if kind == "csr" else F.BSR.from_dense(w, mask, block=(4, 1))
           if kind == "bsr" else F.SemiStructured.from_dense(w, mask))
    x[3, 7] = float("nan")
    x[11, 30] = float("inf")
    got = _run(fmt, x, b)
    kept = fmt.to_dense() != 0
    if kind == "csr":
        stored = mask
    elif kind == "bsr":
        stored = mask.reshape(16, 4, 48).any(1, keepdim=True).expand(16, 4, 48).reshape(64, 48)
    else:
        from sparse_prune.kernels import reference

        cols = reference.unpack_2to4_indices(fmt.meta, 48) + torch.arange(12).repeat_interleave(2) * 4
        stored = torch.zeros(64, 48, dtype=torch.bool).scatter_(1, cols, True)
    for token, column in ((3, 7), (11, 30)):
        row = got[token]
        assert not row[kept[:, column]].isfinite().any()
        assert row[~stored[:, column]].isfinite().all()
    others = [t for t in range(20) if t not in (3, 11)]
    assert got[others].isfinite().all()


# n output rows of one weight 1 each: every column of Y is x; the AVX-512 epilogue runs 16 rows
# at a time and the last n % 16 through the 8-row/lane path, so n = 37 checks all three
GELU_ROWS = [1, 16, 37]


@pytest.mark.parametrize("n", GELU_ROWS)
def test_gelu_tails_and_specials(isa, n):
    """The fused exact GELU keeps its relative accuracy in both tails; NaN and +inf pass."""
    x = torch.linspace(-12, 12, 2401).reshape(-1, 1)
    fmt = F.CSR.from_dense(torch.ones(n, 1))
    got = _run(fmt, x, None, gelu=True)
    x64 = x.double()
    ref = x64 * 0.5 * torch.erfc(-x64 / 2 ** 0.5)  # F.gelu's 1 + erf(x/√2) cancels in the left tail
    close = (got.double() - ref).abs() <= 1e-6 * ref.abs() + 1e-37
    assert close.all(), x.expand(-1, n)[~close][:5]
    special = _run(fmt, torch.tensor([[float("nan")], [float("inf")]]), None, gelu=True)
    assert special[0].isnan().all() and (special[1] == float("inf")).all()


# ---------------------------------------------------------------------------------------
# Malformed arguments: ValueError/TypeError naming the argument, never garbage or a crash.


def _csr(n=6, k=10):
    w, mask, x, b = _problem(4, n, k, 0.5, empty_rows=False)
    return F.CSR.from_dense(w, mask), x, b


@pytest.mark.parametrize("bad, message", [
    (lambda c: c.col_indices.clone().fill_(10**6), "col_indices"),
    (lambda c: c.col_indices.clone().fill_(-1), "col_indices"),
    (lambda c: c.col_indices.flip(0).contiguous(), "col_indices"),
])
def test_csr_bad_columns_raise(isa, bad, message):
    c, x, b = _csr()
    with pytest.raises(ValueError, match=message):
        torch.ops.sparse_prune.csr_linear(x, c.values, c.crow_indices, bad(c), c.shape[0], b)


@pytest.mark.parametrize("crow, message", [
    (lambda c: c.crow_indices.flip(0).contiguous(), "crow_indices"),
    (lambda c: torch.cat([c.crow_indices[:-1], c.crow_indices[-1:] + 5]), "crow_indices"),
    (lambda c: c.crow_indices[:-1].contiguous(), "crow_indices"),
    (lambda c: c.crow_indices.float(), "crow_indices"),
])
def test_csr_bad_crow_raise(crow, message):
    c, x, b = _csr()
    with pytest.raises((ValueError, TypeError), match=message):
        torch.ops.sparse_prune.csr_linear(x, c.values, crow(c), c.col_indices, c.shape[0], b)


def test_bad_dtypes_and_shapes_raise():
    c, x, b = _csr()
    with pytest.raises(TypeError, match="values dtype"):
        torch.ops.sparse_prune.csr_linear(x, c.values.double(), c.crow_indices, c.col_indices, 6, b)
    with pytest.raises(TypeError, match="x dtype"):
        torch.ops.sparse_prune.csr_linear(x.int(), c.values, c.crow_indices, c.col_indices, 6, b)
    with pytest.raises(ValueError, match="bias"):
        torch.ops.sparse_prune.csr_linear(x, c.values, c.crow_indices, c.col_indices, 6, b[:3])
    with pytest.raises(ValueError, match="2-D"):
        torch.ops.sparse_prune.csr_linear(x[0], c.values, c.crow_indices, c.col_indices, 6, b)
    w = torch.randn(4, 8)
    s = F.SemiStructured.from_dense(w, _two_four(w))
    with pytest.raises(ValueError, match="multiple of 4"):
        torch.ops.sparse_prune.semi24_linear(torch.randn(3, 6), s.values, s.meta, None)
    with pytest.raises(TypeError, match="meta dtype"):
        torch.ops.sparse_prune.semi24_linear(torch.randn(3, 8), s.values, s.meta.int(), None)
    blk = F.BSR.from_dense(w, w != 0, block=(2, 4))
    bad_col = blk.col_indices.clone().fill_(2)  # only block columns 0..1 exist for K = 8
    with pytest.raises(ValueError, match="col_indices"):
        torch.ops.sparse_prune.bsr_linear(torch.randn(3, 8), blk.values, blk.crow_indices, bad_col, 4, None)


def test_isa_switch_refuses_unknown(monkeypatch):
    monkeypatch.setenv("SPARSE_PRUNE_CPU_ISA", "avx1024")
    with pytest.raises(ValueError, match="SPARSE_PRUNE_CPU_ISA must be one of auto, avx512, avx2, portable"):
        ops.cpu_isa()
    w, mask, x, b = _problem(4, 6, 10, 0.5)
    c = F.CSR.from_dense(w, mask)
    with pytest.raises(ValueError, match="SPARSE_PRUNE_CPU_ISA"):
        _run(c, x, b)


# ---------------------------------------------------------------------------------------
# The ops as torch sees them: opcheck, torch.compile, torch.export.


@pytest.mark.parametrize("kind", ["csr", "bsr", "2:4"])
def test_opcheck(kind):
    w, mask, x, b = _problem(9, 16, 32, 0.4, empty_rows=False)
    if kind == "csr":
        c = F.CSR.from_dense(w, mask)
        torch.library.opcheck(torch.ops.sparse_prune.csr_linear.default,
                              (x, c.values, c.crow_indices, c.col_indices, 16, b, None, True))
    elif kind == "bsr":
        c = F.BSR.from_dense(w, mask, block=(4, 1))
        torch.library.opcheck(torch.ops.sparse_prune.bsr_linear.default,
                              (x, c.values, c.crow_indices, c.col_indices, 16, b, True))
    else:
        c = F.SemiStructured.from_dense(w, _two_four(w))
        torch.library.opcheck(torch.ops.sparse_prune.semi24_linear.default, (x, c.values, c.meta, b, True))


class _Layer(torch.nn.Module):
    def __init__(self, fmt, bias):
        super().__init__()
        self.fmt, self.bias = fmt, bias

    def forward(self, x):
        return _run(self.fmt, x, self.bias, gelu=True)


def test_compile_and_export():
    w, mask, x, b = _problem(13, 24, 40, 0.3, empty_rows=False)
    layer = _Layer(F.CSR.from_dense(w, mask), b)
    eager = layer(x)
    compiled = torch.compile(layer, backend="inductor", fullgraph=True)(x)
    torch.testing.assert_close(compiled, eager)
    exported = torch.export.export(layer, (x,))
    torch.testing.assert_close(exported.module()(x), eager)


# ---------------------------------------------------------------------------------------
# A converted model whose state dict was tampered with: load_state_dict and the CPU kernel refuse, never read out
# of bounds (issue 21's segfault came from MKL's unchecked sparse tensors on this path).


@pytest.mark.parametrize("field, value, message", [
    ("col_indices", 10**6, "col_indices"),
    ("col_indices", -1, "col_indices"),
    ("crow_indices", 10**6, "crow_indices"),
])
def test_tampered_state_dict_is_refused_at_load_and_at_forward(field, value, message):
    import sparse_prune as sp

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(32, 16))
    masks = sp.prune(model, "l1_unstructured", amount=0.5)
    fast = sp.convert(model, masks, format="csr")
    sd = fast.state_dict()
    if field == "crow_indices":
        sd["0.crow_indices"][-1] = value
    else:
        sd[f"0.{field}"][:] = value  # state_dict() shares the buffers' storage: the layer is tampered too
    with pytest.raises(ValueError, match=f"load_state_dict: 0: invalid csr arrays: {message}"):
        fast.load_state_dict(sd)  # SparseLinear validates what it loads
    with pytest.raises(ValueError, match=message):
        fast(torch.randn(3, 32))  # and the CPU kernel still refuses the tampered buffers


# ---------------------------------------------------------------------------------------
# Found by a hostile review: shapes that overflow sizes, padding, metadata, far tails, knobs.


def test_huge_block_side_is_a_value_error():
    x = torch.randn(1, 4)
    empty = torch.tensor([], dtype=torch.long)
    with pytest.raises(ValueError, match="block sides"):
        torch.ops.sparse_prune.bsr_linear(x, torch.ones(0, 1, 2**59), torch.tensor([0, 0]), empty, 1, None)
    with pytest.raises(ValueError, match="block sides"):
        torch.ops.sparse_prune.bsr_linear(torch.randn(300, 64), torch.ones(0, 2**60, 1), torch.tensor([0, 0]),
                                          empty, 1, torch.ones(1), True)


def test_bsr_padding_must_be_zero():
    values = torch.ones(1, 1, 4)
    values[0, 0, 3] = float("inf")  # K = 3: column 3 of the block is padding
    args = (torch.randn(2, 3), values, torch.tensor([0, 1]), torch.tensor([0]), 1, None)
    with pytest.raises(ValueError, match="padding"):
        torch.ops.sparse_prune.bsr_linear(*args)
    with pytest.raises(ValueError, match="padding"):
        F.BSR(values, torch.tensor([0, 1]), torch.tensor([0]), (1, 3), (1, 4)).validate()
    values[0, 0, 3] = 0.0
    got = torch.ops.sparse_prune.bsr_linear(*args[:1], values, *args[2:])
    torch.testing.assert_close(got, args[0] @ values[0, :, :3].t())


def test_semi24_refuses_malformed_metadata():
    x = torch.arange(8.0).reshape(1, 8)
    values = torch.tensor([[1.0, 2.0, 3.0, 4.0]])
    for word in (0, 0x5555):  # nibbles 0000 / 0101: the two columns are not increasing
        with pytest.raises(ValueError, match="meta"):
            torch.ops.sparse_prune.semi24_linear(x, values, torch.full((1, 1), word, dtype=torch.int16), None)


@pytest.mark.parametrize("n", GELU_ROWS)
def test_gelu_far_left_tail_and_minus_inf(isa, n):
    fmt = F.CSR.from_dense(torch.ones(n, 1))
    got = _run(fmt, torch.tensor([[-1e38], [-1e20], [-30.0], [float("-inf")]]), None, gelu=True)
    assert (got[:3] == 0).all() and got[3].isnan().all()  # x·Φ(x) underflows; -inf·0 is NaN as F.gelu


def test_kblock_knob_is_clamped(monkeypatch):
    monkeypatch.setenv("SPARSE_PRUNE_CPU_KBLOCK", str(2**63 - 1))
    w, mask, x, b = _problem(7, 12, 40, 0.5)
    _check(F.CSR.from_dense(w, mask), x, b)


@pytest.mark.parametrize("k, density", [(200, 0.5), (1300, 0.85)])  # rows of ~100 and ~1100 entries
@pytest.mark.parametrize("index_dtype", [torch.int16, torch.int32])
def test_many_kblocks_short_and_long_rows(isa, no_reference, monkeypatch, k, density, index_dtype):
    """K-blocks of 16 columns: the block bounds of short rows are counted, of long rows (> 1024
    entries) binary-searched; both must cut every row where a plain scan would."""
    monkeypatch.setenv("SPARSE_PRUNE_CPU_KBLOCK", "16")
    w, mask, x, b = _problem(21, 9, k, density)
    _check(F.CSR.from_dense(w, mask, index_dtype=index_dtype), x, b)
    _check(F.BSR.from_dense(w, mask, block=(4, 1)), x, b)
    _check(F.SemiStructured.from_dense(w, _two_four(w)), x, b)


def test_float64_report_names_the_portable_kernel():
    import sparse_prune as sp

    layer = sp.SparseLinear(F.CSR.from_dense(torch.randn(4, 8, dtype=torch.float64)), None)
    assert layer.kernel_name == "cpu:csr-portable"


def test_isa_units_export_only_entry_points():
    """The AVX units must export nothing but their entry points: a weak (inline/template) symbol
    compiled with AVX could be picked by the linker for code every CPU runs (a SIGILL)."""
    import glob
    import shutil
    import subprocess

    import sparse_prune

    lib = glob.glob(str(__import__("pathlib").Path(sparse_prune.__file__).parent / "_C_cpu*.so"))
    nm = shutil.which("nm")
    if not lib or nm is None:
        pytest.skip("needs the built sparse_prune._C_cpu and nm")
    out = subprocess.run([nm, "-C", "--defined-only", lib[0]], capture_output=True, text=True, check=True).stdout
    exported = [line for line in out.splitlines() if "avx2_f32::" in line or "avx512_f32::" in line]
    weak = [line for line in exported if line.split()[1] in ("W", "V", "u", "w", "v")]
    assert not weak, weak[:5]
    public = {line.split(" ", 2)[2].split("(")[0] for line in exported if line.split()[1] == "T"}
    names = {name.rsplit("::", 1)[1] for name in public}
    assert names <= {"compiled", "pack_x", "csr_index", "csr_rows", "bsr_index", "bsr_rows", "semi24_check",
                     "semi24_rows", "csr_segs", "attention_scratch", "attention_tasks"}, names


def test_semi24_metadata_check_covers_the_partial_last_word():
    """K = 20: five groups, the second int16 word holds one; its unused nibbles are ignored."""
    w = torch.randn(3, 20)
    mask = torch.zeros(3, 5, 4, dtype=torch.bool)
    mask[..., 1:3] = True
    s = F.SemiStructured.from_dense(w, mask.reshape(3, 20))
    x = torch.randn(2, 20)
    junk = s.meta.clone()
    junk[:, 1] |= 0x0F00  # an unused nibble of the last word
    torch.testing.assert_close(torch.ops.sparse_prune.semi24_linear(x, s.values, junk, None),
                               x @ s.to_dense().t())
    bad = s.meta.clone()
    bad[2, 1] = 0  # group 4 of row 2: nibble 0000
    with pytest.raises(ValueError, match="meta"):
        torch.ops.sparse_prune.semi24_linear(x, s.values, bad, None)
