"""Backend resolution and the one dispatch table: no silent dense rebuild on a GPU."""

import pytest
import torch

import sparse_prune as sp
from sparse_prune import backends, ops
from sparse_prune import formats as F
from sparse_prune.kernels import triton_common


def _fmt(name, dtype=torch.float32, n=32, k=64, **kw):
    torch.manual_seed(0)
    w = torch.randn(n, k, dtype=dtype)
    if name == "2:4":
        mask = sp.prune(torch.nn.Linear(k, n).requires_grad_(False), "nm")["weight"]
    elif name == "shrink":
        mask = (torch.rand(n, 1) < 0.5) & (torch.rand(1, k) < 0.5)
    else:
        mask = torch.rand(n, k) < 0.3
    return F.FORMATS[name].from_dense(w, mask, **kw)


def test_no_public_op_serves_cuda_with_the_reference():
    """The reference is a CPU kernel only: no catch-all registration (CompositeExplicitAutograd)
    may route CUDA tensors to it; CUDA has its own kernel (csrc/ or Triton), dense_linear aside."""
    for fmt, op in ops.LINEAR_OPS.items():
        name = f"sparse_prune::{op}"
        for key in ("CompositeExplicitAutograd", "CompositeImplicitAutograd"):
            assert not torch._C._dispatch_has_kernel_for_dispatch_key(name, key), (op, key)
        assert ops.has_cuda_kernel(op), op
        if sp.has_cuda_extension() and fmt in ("2:4", "csr"):
            # 2:4: the checks of ops._semi24_mma_sp (metadata once, alignment, compute
            # capability) in front of csrc/'s mma.sp kernel, the private op semi24_linear_mma_sp
            cuda_op = f"{name}_mma_sp" if fmt == "2:4" else name
            assert "register_ops.cpp" in torch._C._dispatch_dump(cuda_op).split("CUDA:")[1].splitlines()[0]
            if fmt == "2:4":
                assert "ops.py" in torch._C._dispatch_dump(name).split("CUDA:")[1].splitlines()[0]


@pytest.mark.skipif(not sp.has_cuda_extension(), reason="needs the compiled extension")
@pytest.mark.skipif(triton_common.unavailable_reason() is not None, reason="needs Triton")
def test_auto_on_cuda_picks_our_kernels_else_dense_never_the_rebuild(monkeypatch):
    from sparse_prune.kernels import sm90

    cuda = "cuda"
    hopper = sm90.has_sm90_extension() and sm90.has_sm90_device()  # true on the H100/H200 runs
    assert backends.resolve_backend("auto", "2:4", _fmt("2:4", torch.bfloat16), cuda) == (
        "cuda:sm90" if hopper else "cuda")
    assert backends.resolve_backend("auto", "2:4", _fmt("2:4", torch.float32), cuda) == "triton"  # no fp32 mma.sp
    assert backends.resolve_backend("auto", "2:4", _fmt("2:4", torch.float16, k=40), cuda) == "triton"  # K % 16
    assert backends.resolve_backend("auto", "csr", _fmt("csr"), cuda) == "cuda"
    assert backends.resolve_backend("auto", "bsr", _fmt("bsr", block=(16, 16)), cuda) == "triton"
    assert backends.resolve_backend("auto", "bsr", _fmt("bsr", block=(8, 8)), cuda) == "dense"
    assert backends.resolve_backend("auto", "shrink", _fmt("shrink"), cuda) == "triton"
    assert backends.resolve_backend("auto", "dense", _fmt("dense"), cuda) == "torch"
    monkeypatch.setattr(triton_common, "unavailable_reason", lambda: "triton is not installed")
    assert backends.resolve_backend("auto", "2:4", _fmt("2:4", torch.float32), cuda) == "dense"
    assert backends.resolve_backend("auto", "bsr", _fmt("bsr", block=(16, 16)), cuda) == "dense"
    # on the CPU auto is "torch": the op's CPU kernel (ours from csrc/cpu/, the reference without it)
    assert backends.resolve_backend("auto", "csr", _fmt("csr")) == "torch"


def test_explicit_backends_say_why_they_cannot_run():
    with pytest.raises(ValueError, match="unknown backend 'opencl'"):
        backends.resolve_backend("opencl", "csr")
    with pytest.raises(ValueError, match="backend 'triton' cannot run format 'bsr'.*block"):
        backends.resolve_backend("triton", "bsr", _fmt("bsr", block=(8, 8)))
    if sp.has_cuda_extension():
        with pytest.raises(ValueError, match="no CUDA kernel for format 'bsr'"):
            backends.resolve_backend("cuda", "bsr", _fmt("bsr", block=(16, 16)))
        with pytest.raises(ValueError, match="sparse tensor cores"):
            backends.resolve_backend("cuda", "2:4", _fmt("2:4", torch.float32))


@pytest.mark.skipif(not sp.has_cuda_extension(), reason="needs the compiled extension")
def test_cuda_backend_on_cpu_tensors_refuses_instead_of_running_the_reference():
    layer = sp.SparseLinear(_fmt("2:4", torch.float16), None, backend="cuda")
    assert layer.backend == "cuda"
    with pytest.raises(ValueError, match="runs on CUDA tensors"):
        layer(torch.randn(3, 64, dtype=torch.float16))


def test_layers_resolve_again_when_moved_or_cast(monkeypatch):
    layer = sp.SparseLinear(_fmt("csr"), torch.randn(32), backend="auto")
    assert (layer.backend, layer.requested_backend) == ("torch", "auto")
    x = torch.randn(4, 64)
    want = torch.nn.functional.linear(x, layer.weight, layer.bias)
    # pretend this device had a faster kernel: the next .to()/.float() must pick it up
    monkeypatch.setattr(backends, "candidates", lambda name, fmt, device: ["dense"] if name == "csr" else ["torch"])
    layer.double()
    assert layer.backend == "dense" and layer.dense_weight is not None and layer.kernel_name.startswith("dense:")
    torch.testing.assert_close(layer(x.double()), want.double(), rtol=1e-5, atol=1e-5)
    monkeypatch.undo()
    layer.float()
    assert layer.backend == "torch" and layer.dense_weight is None
    assert "dense_weight" not in layer.state_dict() and "row_order" not in layer.state_dict()


@pytest.mark.skipif(triton_common.unavailable_reason() is not None, reason="needs Triton")
def test_explicit_backend_that_cannot_follow_a_cast_fails_at_the_call():
    layer = sp.SparseLinear(_fmt("csr"), None, backend="triton")
    layer.double()  # Triton kernels take fp16/bf16/fp32
    with pytest.raises(ValueError, match="float64"):
        layer(torch.randn(2, 64, dtype=torch.float64))
    layer.float()
    assert layer.backend == "triton" and layer(torch.randn(2, 64)).shape == (2, 32)


def test_convert_warns_once_and_counts_what_it_left_dense(hf_vit):
    masks = sp.prune(hf_vit, "l1_unstructured", amount=0.5)  # not 2:4
    with pytest.warns(UserWarning, match=r"format '2:4' left \d+ masked weight\(s\) dense") as seen:
        fast = sp.convert(hf_vit, masks, format="2:4")
    assert len([w for w in seen if "left" in str(w.message)]) == 1
    rows = sp.report(fast)
    assert all("not 2:4" in r["why"] for r in rows if "why" in r)


def test_flops_follow_the_kernel():
    csr, s24 = _fmt("csr"), _fmt("2:4", torch.float16)
    dense = 2 * 32 * 64
    # backend "torch" on the CPU: our kernel skips the pruned weights (the reference would rebuild)
    expected = 2 * csr.nnz if backends.cpu_kernel_runs("csr", "cpu") else dense
    assert backends.flops_per_row("csr", "torch", csr) == expected
    assert backends.flops_per_row("csr", "triton", csr) == 2 * csr.nnz
    assert backends.flops_per_row("csr", "dense", csr) == dense
    assert backends.flops_per_row("2:4", "triton", s24) == dense  # expands to a dense tl.dot
    assert backends.flops_per_row("2:4", "cuda", s24) == dense // 2  # sparse tensor cores skip half


def test_cusparselt_refusals_name_it(monkeypatch):
    with pytest.raises(ValueError, match="cusparselt.*2:4 weights only"):
        backends.resolve_backend("cusparselt", "csr", _fmt("csr"))
    with pytest.raises(ValueError, match="cusparselt.*float16/bfloat16"):
        backends.resolve_backend("cusparselt", "2:4", _fmt("2:4", torch.float32))
    with pytest.raises(ValueError, match="multiples of 16"):
        backends.resolve_backend("cusparselt", "2:4", _fmt("2:4", torch.float16, n=40))
    monkeypatch.setattr(torch.backends.cusparselt, "is_available", lambda: False)
    with pytest.raises(ValueError, match="cusparselt.*has no cuSPARSELt"):
        backends.resolve_backend("cusparselt", "2:4", _fmt("2:4", torch.float16))


@pytest.mark.skipif(not torch.backends.cusparselt.is_available(), reason="torch without cuSPARSELt")
def test_cusparselt_layer_on_cpu_tensors_is_a_clear_error():
    layer = sp.SparseLinear(_fmt("2:4", torch.float16), None, backend="cusparselt")
    assert layer.backend == "cusparselt" and layer.cslt_packed is None  # compressed once bound to CUDA
    with pytest.raises(ValueError, match="'cusparselt' runs on CUDA tensors"):
        layer(torch.randn(3, 64, dtype=torch.float16))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("m", [1, 37, 394])
@pytest.mark.parametrize("bias", [True, False])
def test_cusparselt_matches_the_masked_dense_layer(dtype, m, bias):
    from sparse_prune.agreement import check_matches

    fmt = _fmt("2:4", dtype, n=96, k=128)
    b = torch.randn(96, dtype=dtype) if bias else None
    layer = sp.SparseLinear(fmt, b, backend="cusparselt").to("cuda")
    assert layer.cslt_packed is not None
    x = torch.randn(m, 128, dtype=dtype, device="cuda")
    w = fmt.to_dense().cuda()
    bias_cuda = None if b is None else b.cuda()
    reference = torch.nn.functional.linear(x.double(), w.double(), None if b is None else bias_cuda.double())
    check_matches(layer(x), reference, torch.nn.functional.linear(x, w, bias_cuda), "cusparselt")
    graph = torch.cuda.CUDAGraph()
    layer(x)
    with torch.cuda.graph(graph):
        out = layer(x)
    graph.replay()
    torch.testing.assert_close(out, layer(x), rtol=0, atol=0)
    compiled = torch.compile(layer, fullgraph=True)
    torch.testing.assert_close(compiled(x), layer(x))


def test_converted_layers_keep_the_request_and_follow_the_device(hf_vit, monkeypatch):
    """convert(backend="auto") on the CPU, then a move: the layers resolve again (a CPU model
    moved to CUDA runs our kernels, not the per-call rebuild)."""
    masks = sp.prune(hf_vit, "l1_unstructured", amount=0.9)
    fast = sp.convert(hf_vit, masks, format="csr")
    layers = [m for m in fast.modules() if isinstance(m, sp.SparseLinear)]
    assert layers and {(m.requested_backend, m.backend) for m in layers} == {("auto", "torch")}
    monkeypatch.setattr(backends, "candidates", lambda name, fmt, device: ["dense"])  # "this device"
    fast.double()
    assert {m.backend for m in layers} == {"dense"}
    # and where auto resolves to dense at conversion time, convert builds the layers (no crash)
    again = sp.convert(hf_vit, masks, format="bsr", block=(8, 8))
    assert {m.backend for m in again.modules() if isinstance(m, sp.SparseLinear)} == {"dense"}


def test_a_move_to_the_same_device_keeps_the_payloads():
    layer = sp.SparseLinear(_fmt("csr"), None, backend="auto")
    before = layer.kernel_name, layer._bound_key
    layer.to("cpu")
    layer.float()
    assert (layer.kernel_name, layer._bound_key) == before


@pytest.mark.skipif(not sp.has_cuda_extension(), reason="needs the compiled extension")
@pytest.mark.skipif(triton_common.unavailable_reason() is not None, reason="needs Triton")
def test_shrink_on_cuda_never_materializes(monkeypatch):
    # without Triton, shrink keeps its gather-GEMM-scatter reference: it is no rebuild
    monkeypatch.setattr(triton_common, "unavailable_reason", lambda: "triton is not installed")
    assert backends.resolve_backend("auto", "shrink", _fmt("shrink"), "cuda") == "torch"


def test_sm90_backend_refusals_and_cpu_call():
    from sparse_prune.kernels import sm90

    with pytest.raises(ValueError, match="'cuda:sm90' cannot run format 'csr'.*2:4 weights only"):
        backends.resolve_backend("cuda:sm90", "csr", _fmt("csr"))
    if not sm90.has_sm90_extension():
        with pytest.raises(ValueError, match="sm90 extension is not loaded"):
            backends.resolve_backend("cuda:sm90", "2:4", _fmt("2:4", torch.float16))
        return
    with pytest.raises(ValueError, match="float16/bfloat16"):
        backends.resolve_backend("cuda:sm90", "2:4", _fmt("2:4", torch.float32))
    layer = sp.SparseLinear(_fmt("2:4", torch.bfloat16), None, backend="cuda:sm90", activation="gelu")
    assert layer.kernel_name == "cuda:sm90" and layer.fused_activation and layer.sm90_e is None
    with pytest.raises(ValueError, match="'cuda:sm90' runs on CUDA tensors"):
        layer(torch.randn(2, 64, dtype=torch.bfloat16))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_sm90_backend_end_to_end(dtype, hf_vit, images):
    from sparse_prune.agreement import check_matches
    from sparse_prune.kernels import sm90

    if not (sm90.has_sm90_extension() and sm90.has_sm90_device()):
        pytest.skip("needs the sm90 extension and an sm_90 GPU")
    import copy

    masks = sp.prune(hf_vit, "nm")
    reference = masks.apply(copy.deepcopy(hf_vit)).double()(images.double()).logits
    model = copy.deepcopy(hf_vit).to("cuda", dtype)
    x = images.to("cuda", dtype)
    baseline = masks.apply(copy.deepcopy(model))(x).logits
    fast = sp.convert(model, masks, format="2:4")  # auto prefers our Hopper kernel
    fc1 = fast.get_submodule("vit.layers.0.mlp.fc1")
    assert fc1.backend == "cuda:sm90" and fc1.fused_activation
    check_matches(fast(x).logits, reference.to("cuda"), baseline, f"sm90 e2e {dtype}")
    graph, out = torch.cuda.CUDAGraph(), None
    fast(x)
    with torch.cuda.graph(graph):
        out = fast(x).logits
    graph.replay()
    torch.testing.assert_close(out, fast(x).logits, rtol=0, atol=0)
