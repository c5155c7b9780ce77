"""Hopper 2:4 GEMM (CUTLASS sm90a, sparse_prune._C_sm90) and its metadata packer.

On this CPU machine: the extension loads where it was built, CuTe's own layouts (evaluated on
the host by the extension) equal our Python index math, the packer's output, the fakes and the
errors. Everything that runs the kernel is marked `gpu` and needs an sm_90 device.
"""

import importlib.util

import pytest
import torch
import torch.nn.functional as Fn
from torch._subclasses.fake_tensor import FakeTensorMode

import sparse_prune as sp
from sparse_prune import formats as F
from sparse_prune.kernels import sm90

needs_ext = pytest.mark.skipif(not sm90.has_sm90_extension(),
                               reason=f"sparse_prune._C_sm90 not loaded: {sm90.sm90_extension_error()}")
needs_h100 = pytest.mark.skipif(not (sm90.has_sm90_extension() and sm90.has_sm90_device()),
                                reason="needs sparse_prune._C_sm90 and an sm_90 GPU")


def _two_four(n, k, dtype, seed=0, device="cpu", keep=0.85):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g)
    mask = sp.prune(torch.nn.Sequential(torch.nn.Linear(k, n)), "nm")["0.weight"]
    mask &= torch.rand(n, k, generator=g) < keep  # some groups keep fewer than two
    w = w.to(dtype)
    return w, mask, F.SemiStructured.from_dense(w, mask).to(device)


def _nibble(meta, row, group):
    return (int(meta[row, group // 4]) & 0xFFFF) >> (4 * (group % 4)) & 0xF


# --- on any machine -----------------------------------------------------------------------


def test_module_imports_and_reports_its_state():
    assert isinstance(sm90.has_sm90_extension(), bool)
    err = sm90.sm90_extension_error()
    assert (err is None) == sm90.has_sm90_extension()
    assert sm90.load_sm90_extension() == sm90.has_sm90_extension()  # idempotent, never raises


def test_built_extension_loads():
    """Where `pip install`/`build_ext` produced _C_sm90, it must load (CPU machine included)."""
    if importlib.util.find_spec("sparse_prune._C_sm90") is None:
        pytest.skip("sparse_prune._C_sm90 not built (no CUTLASS headers or SPARSE_PRUNE_SM90=0)")
    assert sm90.has_sm90_extension(), sm90.sm90_extension_error()


@needs_ext
@pytest.mark.parametrize("rows,cols", [(1, 16), (64, 128), (70, 48), (130, 272), (197, 768), (3, 400)])
def test_layout_index_math_matches_cute(rows, cols):
    """Our packer's offsets = the offsets CuTe computes for the kernel's fill_layoutA/E."""
    a_cute, e_cute = torch.ops.sparse_prune.semi24_sm90_layout(rows, cols)
    torch.testing.assert_close(sm90.a_offsets(rows, cols), a_cute, rtol=0, atol=0)
    torch.testing.assert_close(sm90.e_byte_offsets(rows, cols), e_cute, rtol=0, atol=0)
    # A is exactly our row-major values [N, K/2]; E bytes are distinct and inside e.
    assert torch.equal(a_cute.reshape(-1), torch.arange(rows * cols // 2))
    er, ec = sm90.e_shape(rows, cols)
    assert e_cute.unique().numel() == e_cute.numel() and int(e_cute.max()) < er * ec


def test_e_offsets_are_a_permutation_of_the_padded_tensor():
    rows, cols = 128, 256  # no padding: every byte of e is addressed exactly once
    off = sm90.e_byte_offsets(rows, cols).reshape(-1)
    assert torch.equal(off.sort().values, torch.arange(rows * cols // 8))


def test_pack_documented_example():
    """docs/semi_structured_layout.md: one row, K = 16, meta 0x488D (nibbles 13, 8, 8, 4)."""
    meta = torch.tensor([[0x488D]], dtype=torch.int16)
    e = torch.ops.sparse_prune.semi24_sm90_pack(meta, 16)
    assert e.shape == (64, 16) and e.dtype == torch.uint8
    flat = e.reshape(-1)
    assert flat[0] == 0x8D and flat[1] == 0x48  # groups 0|1 and 2|3, low nibble first
    assert int(flat[2:].count_nonzero()) == 0  # padding rows/columns are 0


@pytest.mark.parametrize("n,k", [(20, 32), (70, 48), (130, 272), (768, 256)])
def test_pack_places_every_nibble(n, k):
    _, _, fmt = _two_four(n, k, torch.float16, seed=n + k)
    e = torch.ops.sparse_prune.semi24_sm90_pack(fmt.meta, k)
    assert tuple(e.shape) == sm90.e_shape(n, k)
    flat = e.reshape(-1)
    off = sm90.e_byte_offsets(n, k)
    g = torch.Generator().manual_seed(1)
    for _ in range(200):
        r = int(torch.randint(n, (1,), generator=g))
        grp = int(torch.randint(k // 4, (1,), generator=g))
        byte = int(flat[off[r, grp // 2]])
        assert (byte >> (4 * (grp % 2))) & 0xF == _nibble(fmt.meta, r, grp)
    untouched = torch.ones(flat.numel(), dtype=torch.bool)
    untouched[off.reshape(-1)] = False
    assert int(flat[untouched].count_nonzero()) == 0


def test_pack_opcheck_and_errors():
    _, _, fmt = _two_four(70, 48, torch.bfloat16)
    torch.library.opcheck(torch.ops.sparse_prune.semi24_sm90_pack.default, (fmt.meta, 48))
    with pytest.raises(ValueError, match="multiple of 16"):
        sm90.pack_metadata(torch.zeros(4, 3, dtype=torch.int16), 40)
    with pytest.raises(ValueError, match="int16"):
        sm90.pack_metadata(torch.zeros(4, 3, dtype=torch.int32), 48)
    with pytest.raises(ValueError, match=r"\[N, 3\]"):
        sm90.pack_metadata(torch.zeros(4, 2, dtype=torch.int16), 48)
    a, e = sm90.pack(fmt.values, fmt.meta, 48)  # N = 70: two zero rows appended
    assert a.shape == (72, 24) and torch.equal(a[:70], fmt.values) and not a[70:].any()
    assert e.shape == sm90.e_shape(70, 48)
    _, _, f64 = _two_four(64, 48, torch.float16)
    a, _ = sm90.pack(f64.values, f64.meta, 48)
    assert a.data_ptr() == f64.values.data_ptr()  # N % 8 == 0: the values themselves
    _, _, f32 = _two_four(8, 32, torch.float32)
    with pytest.raises(ValueError, match="float16 or bfloat16"):
        sm90.pack(f32.values, f32.meta, 32)


def test_linear_fake_shapes_and_checks():
    with FakeTensorMode():
        x = torch.empty(197, 768, dtype=torch.bfloat16)
        values = torch.empty(3072, 384, dtype=torch.bfloat16)
        e = torch.empty(*sm90.e_shape(3072, 768), dtype=torch.uint8)
        bias = torch.empty(3072, dtype=torch.bfloat16)
        op = torch.ops.sparse_prune.semi24_sm90_linear
        y = op(x, values, e, 3072, bias, 1, -1)
        assert y.shape == (197, 3072) and y.dtype == torch.bfloat16
        odd = op(x, torch.empty(72, 384, dtype=torch.bfloat16), torch.empty(*sm90.e_shape(70, 768), dtype=torch.uint8), 70)
        assert odd.shape == (197, 70)
        with pytest.raises(RuntimeError, match="e must be uint8"):
            op(x, values, e[:64], 3072, None, 0, -1)
        with pytest.raises(RuntimeError, match=r"a must be \[round_up\(N, 8\), K/2\]"):
            op(x, values[:, :100], e, 3072, None, 0, -1)
        with pytest.raises(RuntimeError, match=r"a must be \[round_up"):
            op(x, values, e, 3060, None, 0, -1)  # a must then have 3064 rows
        with pytest.raises(RuntimeError, match="bias must be"):
            op(x, values, e, 3072, bias[:5], 0, -1)
        with pytest.raises(RuntimeError, match="activation"):
            op(x, values, e, 3072, None, 2, -1)
        with pytest.raises(RuntimeError, match="tile must be"):
            op(x, values, e, 3072, None, 0, 5)
        with pytest.raises(RuntimeError, match="float16 or bfloat16"):
            op(x.float(), values.float(), e, 3072, None, 0, -1)


def test_linear_on_cpu_tensors_is_a_clear_error():
    _, _, fmt = _two_four(32, 64, torch.float16)
    a, e = sm90.pack(fmt.values, fmt.meta, 64)
    with pytest.raises(ValueError, match="runs on CUDA sm_90 tensors"):
        torch.ops.sparse_prune.semi24_sm90_linear(torch.randn(3, 64, dtype=torch.float16), a, e, 32)
    with pytest.raises(ValueError, match="runs on CUDA sm_90 tensors"):
        torch.ops.sparse_prune.semi24_sm90_cutlass_compress(torch.zeros(8, 32, dtype=torch.float16))
    with pytest.raises(ValueError, match="activation must be one of"):
        sm90.linear(torch.randn(3, 64, dtype=torch.float16), a, e, 32, activation="relu")


# --- on an sm_90 GPU ------------------------------------------------------------------------

EPILOGUES = [(False, "none"), (True, "none"), (True, "gelu"), (False, "gelu")]
TOL = {torch.float16: 1e-2, torch.bfloat16: 3e-2}


def _expect(x, w, mask, bias, activation):
    dense = torch.where(mask, w, torch.zeros((), dtype=w.dtype)).float().to(x.device)
    y = Fn.linear(x.float(), dense, None if bias is None else bias.float())
    return Fn.gelu(y) if activation == "gelu" else y


def _close(y, want, dtype):
    scale = max(1.0, want.abs().max().item())
    torch.testing.assert_close(y.float(), want, rtol=TOL[dtype], atol=TOL[dtype] * scale)


@pytest.mark.gpu
@needs_h100
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("m", [1, 37, 197, 1000])
@pytest.mark.parametrize("n,k", [(70, 48), (33, 64), (768, 3072), (3072, 768), (2304, 768)])
@pytest.mark.parametrize("with_bias,activation", EPILOGUES)
def test_sm90_linear_matches_reference(dtype, m, n, k, with_bias, activation):
    w, mask, fmt = _two_four(n, k, dtype, seed=m + n + k, device="cuda")
    a, e = sm90.pack(fmt.values, fmt.meta, k)
    x = torch.randn(m, k, device="cuda", dtype=dtype)
    b = torch.randn(n, device="cuda", dtype=dtype) if with_bias else None
    y = sm90.linear(x, a, e, n, b, activation=activation)
    assert y.shape == (m, n) and y.dtype == dtype and y.is_contiguous()
    _close(y, _expect(x, w, mask, b, activation), dtype)


@pytest.mark.gpu
@needs_h100
@pytest.mark.parametrize("tile", [0, 1])
@pytest.mark.parametrize("m", [5, 197, 1576])
def test_sm90_every_tile_config(tile, m):
    dtype = torch.bfloat16
    w, mask, fmt = _two_four(768, 768, dtype, seed=m, device="cuda")
    a, e = sm90.pack(fmt.values, fmt.meta, 768)
    x = torch.randn(m, 768, device="cuda", dtype=dtype)
    b = torch.randn(768, device="cuda", dtype=dtype)
    _close(sm90.linear(x, a, e, 768, b, "gelu", tile=tile), _expect(x, w, mask, b, "gelu"), dtype)


@pytest.mark.gpu
@needs_h100
def test_sm90_negative_zero_weights_and_k_multiples():
    for k in (16, 32, 64, 784):
        w, mask, _ = _two_four(40, k, torch.float16, seed=k, device="cpu", keep=1.0)
        w = torch.where(mask & (torch.rand(40, k) < 0.3), torch.tensor(-0.0, dtype=w.dtype), w)
        fmt = F.SemiStructured.from_dense(w, mask).to("cuda")
        a, e = sm90.pack(fmt.values, fmt.meta, k)
        x = torch.randn(19, k, device="cuda", dtype=torch.float16)
        y = sm90.linear(x, a, e, 40)
        assert torch.isfinite(y).all()
        _close(y, _expect(x, w.cuda(), mask.cuda(), None, "none"), torch.float16)


@pytest.mark.gpu
@needs_h100
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("n,k", [(64, 128), (70, 48), (768, 3072), (3072, 768)])
def test_sm90_pack_equals_cutlass_compressor(dtype, n, k):
    """Every group keeps two nonzeros: CUTLASS's compressor and our (values, pack) must agree
    byte for byte (with fewer nonzeros the encodings of the padding differ, not the product)."""
    w, mask, _ = _two_four(n, k, dtype, seed=n * k, keep=1.0)
    nonzero = torch.where(w.float() >= 0, 1.0, -1.0) * (w.float().abs() + 0.5)  # no kept zeros
    w = torch.where(mask, nonzero, 0.0).to(dtype)
    fmt = F.SemiStructured.from_dense(w, mask).to("cuda")
    a, e = sm90.pack(fmt.values, fmt.meta, k)
    ca, ce = torch.ops.sparse_prune.semi24_sm90_cutlass_compress(w.cuda())
    assert torch.equal(ca, fmt.values), "compressed A differs from SemiStructured.values"
    assert torch.equal(ce, e), "our metadata pack differs from CUTLASS's compressor"


@pytest.mark.gpu
@needs_h100
def test_sm90_pack_on_gpu_equals_cpu():
    _, _, fmt = _two_four(300, 768, torch.bfloat16)
    cpu = torch.ops.sparse_prune.semi24_sm90_pack(fmt.meta, 768)
    gpu = torch.ops.sparse_prune.semi24_sm90_pack(fmt.meta.cuda(), 768)
    assert torch.equal(cpu, gpu.cpu())


@pytest.mark.gpu
@needs_h100
def test_sm90_side_stream_graph_compile_and_opcheck():
    dtype = torch.bfloat16
    w, mask, fmt = _two_four(768, 768, dtype, device="cuda")
    a, e = sm90.pack(fmt.values, fmt.meta, 768)
    b = torch.randn(768, device="cuda", dtype=dtype)
    x = torch.randn(197, 768, device="cuda", dtype=dtype)
    want = sm90.linear(x, a, e, 768, b, "gelu")
    _close(want, _expect(x, w, mask, b, "gelu"), dtype)

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        got = sm90.linear(x, a, e, 768, b, "gelu")
    torch.cuda.current_stream().wait_stream(side)
    torch.testing.assert_close(got, want, rtol=0, atol=0)

    static_x = x.clone()
    sm90.linear(static_x, a, e, 768, b, "gelu")  # warm-up outside capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = sm90.linear(static_x, a, e, 768, b, "gelu")
    x2 = torch.randn_like(x)
    static_x.copy_(x2)
    graph.replay()
    torch.cuda.synchronize()
    torch.testing.assert_close(out, sm90.linear(x2, a, e, 768, b, "gelu"), rtol=0, atol=0)

    class Layer(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.register_buffer("a", a)
            self.register_buffer("e", e)
            self.bias = torch.nn.Parameter(b, requires_grad=False)

        def forward(self, t):
            flat = t.reshape(-1, t.shape[-1])
            y = torch.ops.sparse_prune.semi24_sm90_linear(flat, self.a, self.e, 768, self.bias, 1, -1)
            return y.reshape(*t.shape[:-1], y.shape[-1])

    layer = Layer()
    compiled = torch.compile(layer, fullgraph=True)
    x3 = torch.randn(2, 197, 768, device="cuda", dtype=dtype)
    torch.testing.assert_close(compiled(x3), layer(x3), rtol=0, atol=0)

    torch.library.opcheck(torch.ops.sparse_prune.semi24_sm90_linear.default, (x, a, e, 768, b, 1, -1))
    torch.library.opcheck(torch.ops.sparse_prune.semi24_sm90_linear.default, (x[:5], a, e, 768, None, 0, 1))


@pytest.mark.gpu
@needs_h100
def test_sm90_errors_on_the_device():
    _, _, fmt = _two_four(64, 64, torch.float16, device="cuda")
    a, e = sm90.pack(fmt.values, fmt.meta, 64)
    x = torch.randn(8, 64, device="cuda", dtype=torch.float16)
    with pytest.raises(RuntimeError, match="e must be uint8"):
        torch.ops.sparse_prune.semi24_sm90_linear(x, a, e[:, :4].contiguous(), 64)
    with pytest.raises(RuntimeError, match="a dtype"):
        torch.ops.sparse_prune.semi24_sm90_linear(x.bfloat16(), a, e, 64)
    with pytest.raises(RuntimeError, match="tile must be"):
        torch.ops.sparse_prune.semi24_sm90_linear(x, a, e, 64, None, 0, 7)


@pytest.mark.gpu
@pytest.mark.skipif(not (sm90.has_sm90_extension() and torch.cuda.is_available()
                         and not sm90.has_sm90_device()), reason="needs a non-sm_90 GPU")
def test_sm90_refuses_other_gpus_clearly():
    _, _, fmt = _two_four(64, 64, torch.float16, device="cuda")
    a, e = sm90.pack(fmt.values, fmt.meta, 64)
    with pytest.raises(RuntimeError, match="needs an sm_90 GPU"):
        sm90.linear(torch.randn(8, 64, device="cuda", dtype=torch.float16), a, e, 64)
