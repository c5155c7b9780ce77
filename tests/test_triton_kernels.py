"""The Triton backend (kernels/triton_*.py): every kernel against the reference.

Without CUDA they run through the Triton interpreter (conftest sets TRITON_INTERPRET=1),
in fp32 and fp16; bf16 runs only on a GPU (the interpreter's bf16 tl.dot is wrong).
"""

import copy

import pytest
import torch
import torch.nn.functional as Fn

import sparse_prune as sp
from sparse_prune import formats as F
from sparse_prune.agreement import check_matches
from sparse_prune.kernels import triton_common

pytestmark = [pytest.mark.skipif(not triton_common.available(), reason=str(triton_common.unavailable_reason())),
              pytest.mark.usefixtures("no_reference")]

HAS_CUDA = torch.cuda.is_available()
DEVICE = "cuda" if HAS_CUDA else "cpu"
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if HAS_CUDA else [])


def _weight(n, k, dtype, density=0.3, seed=0, kind="random"):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g).to(dtype)
    if kind == "2:4":
        mask = sp.prune(torch.nn.Linear(k, n).requires_grad_(False), "nm")["weight"]
        mask &= torch.rand(n, k, generator=g) < 0.9  # some groups keep fewer than two
    elif kind == "shrink":
        mask = (torch.rand(n, 1, generator=g) < 0.6) & (torch.rand(1, k, generator=g) < 0.7)
    elif kind == "zero":
        mask = torch.zeros(n, k, dtype=torch.bool)
    else:
        mask = torch.rand(n, k, generator=g) < density
        mask[::4] = False  # empty rows
    return w, mask


def _make(fmt_name, w, mask, block=(16, 16)):
    cls = F.FORMATS[fmt_name]
    return cls.from_dense(w, mask, block=block) if fmt_name == "bsr" else cls.from_dense(w, mask)


def _call(fmt_name, x, fmt, bias, gelu=False):
    ops = torch.ops.sparse_prune
    n = fmt.shape[0]
    if fmt_name == "csr":
        return ops.csr_linear_triton(x, fmt.values, fmt.crow_indices, fmt.col_indices, n, bias, fmt.row_order(), gelu)
    if fmt_name == "bsr":
        return ops.bsr_linear_triton(x, fmt.values, fmt.crow_indices, fmt.col_indices, n, bias, gelu)
    if fmt_name == "2:4":
        return ops.semi24_linear_triton(x, fmt.values, fmt.meta, bias, gelu)
    return ops.shrunk_linear_triton(x, fmt.values, fmt.out_index, fmt.in_index, n, bias, gelu)


def _expect(x, w, mask, bias):
    dense = torch.where(mask, w, torch.zeros((), dtype=w.dtype)).float()
    return Fn.linear(x.float(), dense.to(x.device), None if bias is None else bias.float())


def _check(fmt_name, m, n, k, dtype, bias, kind="random", block=(16, 16), seed=0, gelu=False):
    import sparse_prune.kernels.triton_ops  # noqa: F401

    w, mask = _weight(n, k, dtype, seed=seed, kind="2:4" if fmt_name == "2:4" and kind == "random" else kind)
    if fmt_name == "shrink" and kind == "random":
        w, mask = _weight(n, k, dtype, seed=seed, kind="shrink")
    fmt = _make(fmt_name, w, mask, block).to(DEVICE)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(seed + 1)).to(dtype).to(DEVICE)
    b = torch.randn(n, generator=torch.Generator().manual_seed(seed + 2)).to(dtype).to(DEVICE) if bias else None
    y = _call(fmt_name, x, fmt, b, gelu)
    assert y.shape == (m, n) and y.dtype == dtype and y.is_contiguous()
    _agree(y, x, w, mask, b, gelu, f"{fmt_name} {m}x{k}->{n} {dtype}")


def _agree(y, x, w, mask, bias, gelu=False, what="kernel"):
    """The shared rule: float64 reference, at most 2x the error of F.linear in the same dtype."""
    dense = torch.where(mask, w, torch.zeros((), dtype=w.dtype)).to(x.device)
    reference = Fn.linear(x.double(), dense.double(), None if bias is None else bias.double())
    baseline = Fn.linear(x, dense.to(x.dtype), bias)
    if gelu:
        reference, baseline = Fn.gelu(reference), Fn.gelu(baseline)
    check_matches(y, reference, baseline, what)


FORMATS = ["csr", "bsr", "2:4", "shrink"]


@pytest.mark.parametrize("fmt_name", FORMATS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m", [1, 37])
@pytest.mark.parametrize("n,k", [(20, 24), (70, 36), (48, 64)])
@pytest.mark.parametrize("bias", [True, False])
def test_kernel_matches_reference(fmt_name, dtype, m, n, k, bias):
    _check(fmt_name, m, n, k, dtype, bias)


@pytest.mark.parametrize("fmt_name", FORMATS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m", [1, 37])
def test_fused_gelu_epilogue(fmt_name, dtype, m):
    _check(fmt_name, m, 70, 36 if fmt_name != "2:4" else 48, dtype, bias=True, gelu=True)


def test_fused_gelu_in_a_converted_vit(hf_vit, images):
    hf_vit, images = hf_vit.to(DEVICE), images.to(DEVICE)
    masks = sp.prune(hf_vit, "nm")
    expected = masks.apply(copy.deepcopy(hf_vit))(images).logits
    fast = sp.convert(hf_vit, masks, format="2:4", backend="triton")
    fc1 = fast.get_submodule("vit.layers.0.mlp.fc1")
    assert fc1.activation == "gelu" and fc1.fused_activation
    assert next(r for r in sp.report(fast) if r["name"] == "vit.layers.0.mlp.fc1")["activation"] == "gelu (fused)"
    torch.testing.assert_close(fast(images).logits, expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("fmt_name", FORMATS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_vit_rows(fmt_name, dtype):
    _check(fmt_name, 197 * 2, 96, 64, dtype, bias=True)


@pytest.mark.parametrize("fmt_name", ["csr", "bsr", "2:4"])
def test_all_zero_weight(fmt_name):
    _check(fmt_name, 5, 32, 32, torch.float32, bias=True, kind="zero")


@pytest.mark.parametrize("block", [(16, 32), (32, 16), (64, 64)])
def test_bsr_blocks_and_padding(block):
    _check("bsr", 19, 70, 100, torch.float32, bias=True, block=block)


def test_shrunk_all_rows_kept_and_nothing_kept():
    import sparse_prune.kernels.triton_ops  # noqa: F401

    w = torch.randn(24, 40)
    for mask in (torch.ones(24, 1, dtype=torch.bool) & (torch.rand(1, 40) < 0.5),
                 torch.zeros(24, 40, dtype=torch.bool)):
        fmt = F.Shrunk.from_dense(w, mask).to(DEVICE)
        x, b = torch.randn(3, 40, device=DEVICE), torch.randn(24, device=DEVICE)
        torch.testing.assert_close(_call("shrink", x, fmt, b), _expect(x, w, mask, b).to(DEVICE), rtol=2e-5, atol=2e-5)
        # pruned outputs hold GELU(bias) when the epilogue is fused
        torch.testing.assert_close(_call("shrink", x, fmt, b, True), Fn.gelu(_expect(x, w, mask, b)).to(DEVICE),
                                   rtol=2e-5, atol=2e-5)


def test_csr_long_rows_loop_over_many_chunks():
    """K = 768 at density 0.5: rows of ~384 non-zeros, the chunk loop runs a dozen times."""
    import sparse_prune.kernels.triton_ops  # noqa: F401

    w, mask = _weight(8, 768, torch.float32, density=0.5, seed=4)
    fmt = F.CSR.from_dense(w, mask).to(DEVICE)
    assert int((fmt.crow_indices[1:] - fmt.crow_indices[:-1]).max()) > 300
    x, b = torch.randn(3, 768, device=DEVICE), torch.randn(8, device=DEVICE)
    torch.testing.assert_close(_call("csr", x, fmt, b), _expect(x, w, mask, b).to(DEVICE), rtol=1e-5, atol=1e-4)


def test_index_tensors_on_another_device_are_named():
    # the wrappers the custom ops call (a meta tensor would send the op itself to its fake)
    from sparse_prune.kernels import triton_csr, triton_semi24

    w, mask = _weight(32, 48, torch.float32)
    fmt = F.CSR.from_dense(w, mask)
    with pytest.raises(ValueError, match="crow_indices on meta"):
        triton_csr.csr_linear(torch.randn(2, 48), fmt.values, fmt.crow_indices.to("meta"), fmt.col_indices,
                              None, 32, None)
    s = F.SemiStructured.from_dense(*_weight(32, 48, torch.float32, kind="2:4"))
    with pytest.raises(ValueError, match="meta on meta"):
        triton_semi24.semi24_linear(torch.randn(2, 48), s.values, s.meta.to("meta"), None)


@pytest.mark.gpu
@pytest.mark.parametrize("fmt_name", FORMATS)
def test_every_autotune_config_is_correct(fmt_name):
    """Tests run with one config (SPARSE_PRUNE_TUNE=0); here each config of the full list that
    the autotuner may try on this GPU in bf16 (the shared-memory pruner keeps it) runs alone."""
    from sparse_prune.kernels import triton_bsr, triton_csr, triton_semi24, triton_shrunk
    from sparse_prune.kernels.triton_smem import device_smem_limit

    module, kernel = {"csr": (triton_csr, triton_csr._csr_kernel), "bsr": (triton_bsr, triton_bsr._bsr_kernel),
                      "2:4": (triton_semi24, triton_semi24._semi24_kernel),
                      "shrink": (triton_shrunk, triton_shrunk._shrunk_kernel)}[fmt_name]
    saved = kernel.configs
    try:
        consts = {"BM": 16, "BK": 16} if fmt_name == "bsr" else {}  # _check's default block
        for cfg in module.FULL_CONFIGS:
            if module.smem_estimate(cfg.kwargs, cfg.num_stages, torch.bfloat16, **consts) > device_smem_limit():
                continue
            kernel.configs = [cfg]
            kernel.cache.clear()
            _check(fmt_name, 394, 96, 128, torch.bfloat16, bias=True)
    finally:
        kernel.configs = saved
        kernel.cache.clear()


def test_noncontiguous_input_is_handled():
    import sparse_prune.kernels.triton_ops  # noqa: F401

    w, mask = _weight(32, 48, torch.float32)
    fmt = F.CSR.from_dense(w, mask).to(DEVICE)
    x = torch.randn(48, 10, device=DEVICE).t()  # [10, 48], not contiguous
    torch.testing.assert_close(_call("csr", x, fmt, None), _expect(x, w, mask, None).to(DEVICE), rtol=2e-5, atol=2e-5)


def test_bad_inputs():
    import sparse_prune.kernels.triton_ops  # noqa: F401

    w, mask = _weight(32, 48, torch.float32)
    fmt = F.CSR.from_dense(w, mask)
    ops = torch.ops.sparse_prune
    with pytest.raises(ValueError, match="x must be 2-D"):
        ops.csr_linear_triton(torch.randn(2, 3, 48), fmt.values, fmt.crow_indices, fmt.col_indices, 32, None, fmt.row_order())
    with pytest.raises(ValueError, match="values dtype"):
        ops.csr_linear_triton(torch.randn(2, 48).half(), fmt.values, fmt.crow_indices, fmt.col_indices, 32, None, fmt.row_order())
    with pytest.raises(ValueError, match="bias must be"):
        ops.csr_linear_triton(torch.randn(2, 48), fmt.values, fmt.crow_indices, fmt.col_indices, 32, torch.randn(5), fmt.row_order())
    with pytest.raises(ValueError, match="crow_indices"):
        ops.csr_linear_triton(torch.randn(2, 48), fmt.values, fmt.crow_indices, fmt.col_indices, 31, None, fmt.row_order()[:31])
    with pytest.raises(ValueError, match="dtype must be one of"):
        ops.csr_linear_triton(torch.randn(2, 48).double(), fmt.values.double(), fmt.crow_indices,
                              fmt.col_indices, 32, None, fmt.row_order())
    b8 = F.BSR.from_dense(w, mask, block=(8, 8))
    with pytest.raises(ValueError, match="block"):
        ops.bsr_linear_triton(torch.randn(2, 48), b8.values, b8.crow_indices, b8.col_indices, 32, None)
    s = F.SemiStructured.from_dense(*_weight(32, 48, torch.float32, kind="2:4"))
    with pytest.raises(ValueError, match="meta must be int16"):
        ops.semi24_linear_triton(torch.randn(2, 48), s.values, s.meta.int(), None)
    with pytest.raises(ValueError, match="K % 4"):
        ops.semi24_linear_triton(torch.randn(2, 50), s.values, s.meta, None)


@pytest.mark.parametrize("fmt_name", FORMATS)
def test_opcheck(fmt_name):
    import sparse_prune.kernels.triton_ops  # noqa: F401

    kind = {"2:4": "2:4", "shrink": "shrink"}.get(fmt_name, "random")
    w, mask = _weight(32, 48, torch.float32, kind=kind)
    fmt = _make(fmt_name, w, mask).to(DEVICE)
    x, b = torch.randn(5, 48, device=DEVICE), torch.randn(32, device=DEVICE)
    op = {"csr": torch.ops.sparse_prune.csr_linear_triton, "bsr": torch.ops.sparse_prune.bsr_linear_triton,
          "2:4": torch.ops.sparse_prune.semi24_linear_triton,
          "shrink": torch.ops.sparse_prune.shrunk_linear_triton}[fmt_name]
    args = {"csr": (x, fmt.values, getattr(fmt, "crow_indices", None), getattr(fmt, "col_indices", None),
                    32, b, fmt.row_order() if fmt_name == "csr" else None)}
    if fmt_name == "bsr":
        args = (x, fmt.values, fmt.crow_indices, fmt.col_indices, 32, b)
    elif fmt_name == "2:4":
        args = (x, fmt.values, fmt.meta, b)
    elif fmt_name == "shrink":
        args = (x, fmt.values, fmt.out_index, fmt.in_index, 32, b)
    else:
        args = args["csr"]
    torch.library.opcheck(op, args, test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_static"))


RECIPES = {
    "csr": ("l1_unstructured", {"amount": 0.9}, {}),
    "bsr": ("l1_unstructured", {"amount": 0.7}, {"block": (16, 16)}),
    "2:4": ("nm", {}, {}),
    "shrink": ("ln_structured", {"amount": 0.5}, {"coupled": False}),
}


@pytest.mark.parametrize("fmt_name", FORMATS)
def test_hf_vit_end_to_end(fmt_name, hf_vit, images):
    hf_vit, images = hf_vit.to(DEVICE), images.to(DEVICE)
    method, kw, fkw = RECIPES[fmt_name]
    masks = sp.prune(hf_vit, method, **kw)
    expected = masks.apply(copy.deepcopy(hf_vit))(images).logits
    fast = sp.convert(hf_vit, masks, format=fmt_name, backend="triton", **fkw)
    layers = [m for m in fast.modules() if isinstance(m, sp.SparseLinear)]
    assert layers and all(m.backend == "triton" and m.kernel_name.startswith("triton:") for m in layers)
    torch.testing.assert_close(fast(images).logits, expected, rtol=1e-4, atol=1e-4)
    assert "backend=triton" in repr(layers[0])


def test_compile_inductor_on_cpu(images, hf_vit):
    """The custom ops and their fakes through Inductor (not only the eager backend)."""
    hf_vit, images = hf_vit.to(DEVICE), images.to(DEVICE)
    masks = sp.prune(hf_vit, "l1_unstructured", amount=0.8)
    fast = sp.convert(hf_vit, masks, format="csr", backend="triton")
    lin = fast.get_submodule("vit.layers.0.mlp.fc1")
    x = torch.randn(2, 7, lin.in_features, device=DEVICE)
    compiled = torch.compile(lin, fullgraph=True, backend="inductor")
    torch.testing.assert_close(compiled(x), lin(x))


def test_compile_fullgraph(hf_vit, images):
    hf_vit, images = hf_vit.to(DEVICE), images.to(DEVICE)
    masks = sp.prune(hf_vit, "l1_unstructured", amount=0.8)
    fast = sp.convert(hf_vit, masks, format="csr", backend="triton")
    lin = next(m for m in fast.modules() if isinstance(m, sp.SparseLinear))
    x = torch.randn(2, 7, lin.in_features, device=DEVICE)  # 3-D input through the drop-in module
    compiled = torch.compile(lin, fullgraph=True, backend="eager")
    torch.testing.assert_close(compiled(x), lin(x))
    whole = torch.compile(fast, fullgraph=True, backend="eager")
    torch.testing.assert_close(whole(images).logits, fast(images).logits)


def test_bsr_block_refused_up_front(hf_vit):
    masks = sp.prune(hf_vit, "l1_unstructured", amount=0.5)
    with pytest.raises(ValueError, match="block"):
        sp.convert(hf_vit, masks, format="bsr", backend="triton", block=(8, 8))


def test_save_load_keeps_triton_backend(hf_vit, images, tmp_path):
    hf_vit, images = hf_vit.to(DEVICE), images.to(DEVICE)
    masks = sp.prune(hf_vit, "nm")
    fast = sp.convert(hf_vit, masks, format="2:4", backend="triton")
    sp.save(fast, tmp_path)
    loaded = sp.load(copy.deepcopy(hf_vit), tmp_path)
    assert {m.backend for m in loaded.modules() if isinstance(m, sp.SparseLinear)} == {"triton"}
    torch.testing.assert_close(loaded(images).logits, fast(images).logits, rtol=0, atol=0)
