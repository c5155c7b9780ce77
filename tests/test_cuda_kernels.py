"""backend="cuda": the csrc/ kernels (2:4 on sparse tensor cores, CSR SpMM).

The kernels run only on a GPU (tests marked `gpu`); on this CPU machine the tests check the
wiring: clear errors on CPU tensors, unsupported formats, shapes and dtypes.
"""

import copy

import pytest
import torch
import torch.nn.functional as Fn

import sparse_prune as sp
from sparse_prune import formats as F
from sparse_prune import ops
from sparse_prune.agreement import check_matches

HAS_CUDA = torch.cuda.is_available()
pytestmark = pytest.mark.usefixtures("no_reference")
needs_ext = pytest.mark.skipif(not ops.has_cuda_extension(), reason="CUDA extension not built")


def _two_four(n, k, dtype, seed=0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g)
    mask = sp.prune(torch.nn.Sequential(torch.nn.Linear(k, n)), "nm")["0.weight"]
    mask &= torch.rand(n, k, generator=g) < 0.85  # some groups keep fewer than two
    w = w.to(dtype)
    return w, mask, F.SemiStructured.from_dense(w, mask).to(device)


def _csr(n, k, dtype, density=0.1, seed=0, device="cpu", index_dtype=torch.int32):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g).to(dtype)
    mask = torch.rand(n, k, generator=g) < density
    mask[::5] = False  # empty rows
    return w, mask, F.CSR.from_dense(w, mask, index_dtype=index_dtype).to(device)


def _agree(y, x, w, mask, bias, what):
    """The shared rule: float64 reference, at most 2x the error of cuBLAS in the same dtype."""
    dense = torch.where(mask, w, torch.zeros((), dtype=w.dtype)).to(x.device)
    reference = Fn.linear(x.double(), dense.double(), None if bias is None else bias.double())
    check_matches(y, reference, Fn.linear(x, dense.to(x.dtype), bias), what)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("m", [1, 37, 64, 394])
@pytest.mark.parametrize("n,k", [(20, 32), (70, 48), (96, 768), (768, 3072)])
@pytest.mark.parametrize("bias", [True, False])
def test_semi24_cuda_matches_reference(dtype, m, n, k, bias):
    w, mask, fmt = _two_four(n, k, dtype, seed=m + n, device="cuda")
    x = torch.randn(m, k, device="cuda", dtype=dtype)
    b = torch.randn(n, device="cuda", dtype=dtype) if bias else None
    y = torch.ops.sparse_prune.semi24_linear(x, fmt.values, fmt.meta, b)
    assert y.shape == (m, n) and y.dtype == dtype
    _agree(y, x, w, mask, b, f"mma.sp {m}x{k}->{n} {dtype}")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("m", [1, 37, 64, 394])
@pytest.mark.parametrize("n,k", [(20, 24), (70, 36), (768, 3072)])
@pytest.mark.parametrize("index_dtype", [torch.int32, torch.int16])
@pytest.mark.parametrize("bias", [True, False])
def test_csr_cuda_matches_reference(dtype, m, n, k, index_dtype, bias):
    w, mask, fmt = _csr(n, k, dtype, seed=m + k, device="cuda", index_dtype=index_dtype)
    x = torch.randn(m, k, device="cuda", dtype=dtype)
    b = torch.randn(n, device="cuda", dtype=dtype) if bias else None
    y = torch.ops.sparse_prune.csr_linear(x, fmt.values, fmt.crow_indices, fmt.col_indices, n, b, fmt.row_order())
    _agree(y, x, w, mask, b, f"csr {m}x{k}->{n} {dtype}")


@pytest.mark.gpu
def test_csr_cuda_nnz_zero_gives_bias():
    w, mask, fmt = _csr(16, 32, torch.float16, density=0.0, device="cuda")
    assert fmt.nnz == 0
    b = torch.randn(16, device="cuda", dtype=torch.float16)
    y = torch.ops.sparse_prune.csr_linear(torch.randn(5, 32, device="cuda", dtype=torch.float16),
                                          fmt.values, fmt.crow_indices, fmt.col_indices, 16, b, None)
    torch.testing.assert_close(y, b.expand(5, 16))


@pytest.mark.gpu
def test_cuda_ops_side_stream_graph_and_opcheck():
    w, mask, s24 = _two_four(64, 128, torch.float16, device="cuda")
    _, _, csr = _csr(64, 128, torch.float16, device="cuda")
    x = torch.randn(197, 128, device="cuda", dtype=torch.float16)
    calls = {
        "2:4": lambda: torch.ops.sparse_prune.semi24_linear(x, s24.values, s24.meta, None),
        "csr": lambda: torch.ops.sparse_prune.csr_linear(x, csr.values, csr.crow_indices, csr.col_indices,
                                                         64, None, csr.row_order()),
    }
    for name, fn in calls.items():
        want = fn()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            got = fn()
        torch.cuda.current_stream().wait_stream(side)
        torch.testing.assert_close(got, want, rtol=0, atol=0)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = fn()
        graph.replay()
        torch.cuda.synchronize()
        torch.testing.assert_close(out, want, rtol=0, atol=0, msg=f"{name}: CUDA graph replay differs")
    torch.library.opcheck(torch.ops.sparse_prune.semi24_linear.default, (x, s24.values, s24.meta, None))
    torch.library.opcheck(torch.ops.sparse_prune.csr_linear.default,
                          (x, csr.values, csr.crow_indices, csr.col_indices, 64, None, csr.row_order()))


@pytest.mark.gpu
@pytest.mark.parametrize("fmt,method", [("2:4", "nm"), ("csr", "l1_unstructured")])
def test_hf_vit_end_to_end_cuda(fmt, method, hf_vit, images):
    hf_vit = hf_vit.to("cuda")
    model = copy.deepcopy(hf_vit).half()
    x = images.to("cuda", torch.float16)
    masks = sp.prune(model, method, **({} if fmt == "2:4" else {"amount": 0.9}))
    baseline = masks.apply(copy.deepcopy(model))(x).logits
    reference = masks.apply(copy.deepcopy(hf_vit).double())(images.to("cuda", torch.float64)).logits
    fast = sp.convert(model, masks, format=fmt, backend="cuda")
    assert {m.backend for m in fast.modules() if isinstance(m, sp.SparseLinear)} == {"cuda"}
    check_matches(fast(x).logits, reference, baseline, f"{fmt} cuda")  # relative to the logits' norm
    auto = sp.convert(model, masks, format=fmt, backend="auto")
    assert {m.backend for m in auto.modules() if isinstance(m, sp.SparseLinear)} == {"cuda"}


@pytest.mark.gpu
def test_semi24_cuda_shape_and_dtype_errors():
    _, _, fmt = _two_four(32, 40, torch.float16, device="cuda")  # K = 40: not a multiple of 16
    with pytest.raises(RuntimeError, match="multiple of 16"):
        torch.ops.sparse_prune.semi24_linear(torch.randn(3, 40, device="cuda", dtype=torch.float16),
                                                  fmt.values, fmt.meta, None)
    _, _, f32 = _two_four(32, 64, torch.float32, device="cuda")
    with pytest.raises(RuntimeError, match="float16 or bfloat16"):
        torch.ops.sparse_prune.semi24_linear(torch.randn(3, 64, device="cuda"), f32.values, f32.meta, None)


# --- on any machine -----------------------------------------------------------------------


@pytest.mark.gpu
def test_explicit_torch_backend_on_cuda_warns(hf_vit):
    model = hf_vit.to("cuda")
    with pytest.warns(UserWarning, match="rebuilds the dense weight on every call"):
        sp.convert(model, sp.prune(model, "l1_unstructured", amount=0.9), format="csr", backend="torch")


@pytest.mark.gpu
def test_cpu_converted_model_moved_to_cuda_runs_our_kernels(hf_vit, images):
    masks = sp.prune(hf_vit, "nm")
    fast = sp.convert(hf_vit.half(), masks, format="2:4")  # auto on the CPU: the reference
    assert {m.backend for m in fast.modules() if isinstance(m, sp.SparseLinear)} == {"torch"}
    fast.to("cuda")
    assert {m.backend for m in fast.modules() if isinstance(m, sp.SparseLinear)} == {"cuda"}
    assert fast(images.to("cuda", torch.float16)).logits.isfinite().all()


@needs_ext
def test_cuda_backend_on_cpu_tensors_is_a_clear_error(hf_vit, images):
    model = hf_vit.half()
    fast = sp.convert(model, sp.prune(model, "nm"), format="2:4", backend="cuda")
    assert "backend=cuda" in repr(fast.vit.layers[0].mlp.fc1)
    if not HAS_CUDA:
        with pytest.raises(ValueError, match="runs on CUDA tensors"):
            fast(images.half())


@needs_ext
def test_cuda_backend_refuses_what_it_cannot_run(hf_vit):
    masks = sp.prune(hf_vit, "nm")
    with pytest.raises(ValueError, match="no CUDA kernel for format 'bsr'"):
        sp.convert(hf_vit, masks, format="bsr", backend="cuda")
    with pytest.raises(ValueError, match="float16/bfloat16"):
        sp.convert(hf_vit, masks, format="2:4", backend="cuda")  # fp32 model


def test_cuda_backend_without_extension(hf_vit, monkeypatch):
    monkeypatch.setattr(ops, "has_cuda_extension", lambda: False)
    with pytest.raises(ValueError, match="CUDA extension is not loaded"):
        sp.convert(hf_vit, sp.prune(hf_vit, "l1_unstructured", amount=0.5), format="csr", backend="cuda")
