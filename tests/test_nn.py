"""SparseLinear, convert() and report(): converted models compute the masked dense model."""

import copy
import io
import pickle

import pytest
import torch
from torch import nn

import sparse_prune as sp
from sparse_prune import formats as F

RECIPES = {
    "dense": ("l1_unstructured", {"amount": 0.5}, {}),
    "csr": ("l1_unstructured", {"amount": 0.9}, {}),
    "bsr": ("l1_unstructured", {"amount": 0.7}, {"block": (16, 16)}),
    "2:4": ("nm", {}, {}),
    "shrink": ("ln_structured", {"amount": 0.5, "coupled": True}, {}),
}


def _logits(out):
    return out.logits if hasattr(out, "logits") else out


@pytest.mark.parametrize("fixture", ["hf_vit", "timm_vit"])
@pytest.mark.parametrize("fmt", list(RECIPES))
def test_converted_vit_matches_masked_dense(fixture, fmt, request, images):
    model = request.getfixturevalue(fixture)
    method, kw, fkw = RECIPES[fmt]
    masks = sp.prune(model, method, **kw)
    expected = _logits(masks.apply(copy.deepcopy(model))(images))
    fast = sp.convert(model, masks, format=fmt, **fkw)
    swapped = sum(isinstance(m, sp.SparseLinear) for m in fast.modules())
    # coupled shrink cuts the blocks' Linears physically; the classifier is left out by default
    assert swapped == (0 if fmt == "shrink" else len(masks))
    torch.testing.assert_close(_logits(fast(images)), expected, rtol=1e-5, atol=1e-5)
    # the original model is untouched (inplace=False)
    assert not any(isinstance(m, sp.SparseLinear) for m in model.modules())


@pytest.mark.parametrize("fmt", list(RECIPES))
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("lead", [(7,), (2, 197), (1,)])
def test_sparse_linear_is_drop_in(fmt, bias, lead):
    torch.manual_seed(0)
    lin = nn.Linear(24, 20, bias=bias)
    method, kw, fkw = RECIPES[fmt]
    kw = {k: v for k, v in kw.items() if k != "coupled"}
    masks = sp.prune(lin, method, **kw)
    ref = masks.apply(copy.deepcopy(lin))
    sparse = sp.convert(nn.Sequential(lin), sp.MaskSet({"0.weight": masks["weight"]}), format=fmt, **fkw)[0]
    assert isinstance(sparse, sp.SparseLinear)
    assert (sparse.in_features, sparse.out_features) == (24, 20)
    assert (sparse.bias is None) == (not bias)
    x = torch.randn(*lead, 24)
    torch.testing.assert_close(sparse(x), ref(x), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(sparse.weight, ref.weight, rtol=0, atol=0)
    assert f"format={fmt}" in repr(sparse) and "backend=torch" in repr(sparse)
    # deepcopy, pickle, state_dict, dtype conversion
    for clone in (copy.deepcopy(sparse), pickle.loads(pickle.dumps(sparse))):
        torch.testing.assert_close(clone(x), sparse(x), rtol=0, atol=0)
    buf = io.BytesIO()
    torch.save(sparse.state_dict(), buf)
    assert set(sparse.state_dict()) >= {"values"}
    double = copy.deepcopy(sparse).to(torch.float64)
    assert double.weight_format.values.dtype == torch.float64
    torch.testing.assert_close(double(x.double()), ref.double()(x.double()), rtol=1e-10, atol=1e-10)


def test_wrong_input_width():
    sparse = sp.convert(nn.Sequential(nn.Linear(8, 4)), sp.MaskSet({"0.weight": torch.ones(4, 8, dtype=torch.bool)}),
                        format="csr")[0]
    with pytest.raises(ValueError, match="in_features=8"):
        sparse(torch.randn(3, 7))


def test_unfit_layers_left_dense_with_one_warning(hf_vit, images):
    masks = sp.prune(hf_vit, "l1_unstructured", amount=0.5, include=(nn.Linear, nn.Conv2d))
    with pytest.warns(UserWarning, match=r"left 14 masked weight\(s\) dense") as record:
        fast = sp.convert(hf_vit, masks, format="2:4")
    assert len(record) == 1
    assert "patch_embeddings" in str(record[0].message) and "not 2:4" in str(record[0].message)
    expected = _logits(masks.apply(copy.deepcopy(hf_vit))(images))
    torch.testing.assert_close(_logits(fast(images)), expected, rtol=1e-5, atol=1e-5)


def test_convert_bad_arguments(hf_vit):
    masks = sp.prune(hf_vit, "l1_unstructured", amount=0.5)
    with pytest.raises(ValueError, match="unknown format 'coo'.*csr"):
        sp.convert(hf_vit, masks, format="coo")
    with pytest.raises(ValueError, match="unknown backend 'opencl'"):
        sp.convert(hf_vit, masks, format="csr", backend="opencl")
    with pytest.raises(TypeError, match="MaskSet"):
        sp.convert(hf_vit, dict(masks), format="csr")
    bad = sp.MaskSet({"vit.layers.0.mlp.fc1.weight": torch.ones(3, 3, dtype=torch.bool)})
    with pytest.raises(ValueError, match="shape"):
        sp.convert(hf_vit, bad, format="csr")


def test_convert_inplace(hf_vit):
    masks = sp.prune(hf_vit, "l1_unstructured", amount=0.5)
    out = sp.convert(hf_vit, masks, format="csr", inplace=True)
    assert out is hf_vit
    assert isinstance(hf_vit.vit.layers[0].mlp.fc1, sp.SparseLinear)


@pytest.mark.parametrize("fmt", list(RECIPES))
def test_compile_fullgraph(fmt, hf_vit, images):
    method, kw, fkw = RECIPES[fmt]
    fast = sp.convert(hf_vit, sp.prune(hf_vit, method, **kw), format=fmt, **fkw)
    compiled = torch.compile(fast, fullgraph=True, backend="eager")
    torch.testing.assert_close(_logits(compiled(images)), _logits(fast(images)), rtol=1e-5, atol=1e-5)


def test_report_rows(hf_vit):
    masks = sp.prune(hf_vit, "l1_unstructured", amount=0.9)
    rows = sp.report(sp.convert(hf_vit, masks, format="csr"))
    assert len(rows) == 13
    fc1 = next(r for r in rows if r["name"] == "vit.layers.0.mlp.fc1")
    nnz = int(masks["vit.layers.0.mlp.fc1.weight"].sum())
    assert fc1["format"] == "csr" and fc1["shape"] == [64, 32]
    assert fc1["bytes"] == nnz * 4 + 65 * 4 + nnz * 4
    # our CPU kernel skips the pruned weights: FLOPs count the stored ones
    assert fc1["dense_bytes"] == 64 * 32 * 4 and fc1["flops"] == 2 * nnz
    assert fc1["backend"] == "torch" and fc1["kernel"] == f"cpu:csr-{sp.ops.cpu_isa()}" and fc1["why"]
    assert fc1["density"] == pytest.approx(nnz / (64 * 32))
    text = sp.format_report(rows)
    assert "vit.layers.0.mlp.fc1" in text and text.splitlines()[-1].startswith("total")


@pytest.mark.parametrize(("fmt", "method", "kw", "sparse_flops"), [
    ("csr", "l1_unstructured", {"amount": 0.9}, lambda f: 2 * f.nnz),
    ("bsr", "l1_unstructured", {"amount": 0.9}, lambda f: 2 * f.values.numel()),
    ("2:4", "nm", {}, lambda f: 2 * f.shape[0] * f.shape[1]),  # the Triton 2:4 kernel expands to a dense tl.dot
])
def test_report_flops_count_what_runs(fmt, method, kw, sparse_flops, hf_vit):
    masks = sp.prune(hf_vit, method, **kw)
    fkw = {"block": (16, 16)} if fmt == "bsr" else {}
    row = next(r for r in sp.report(sp.convert(hf_vit, masks, format=fmt, backend="triton", **fkw))
               if r["name"] == "vit.layers.0.mlp.fc1")
    layer = sp.convert(hf_vit, masks, format=fmt, backend="triton", **fkw).get_submodule("vit.layers.0.mlp.fc1")
    assert row["backend"] == "triton" and row["kernel"].startswith("triton:")
    assert row["flops"] == sparse_flops(layer.weight_format)




@pytest.mark.parametrize("fmt", list(RECIPES))
@pytest.mark.parametrize("bias", [True, False])
def test_opcheck_linear_ops(fmt, bias):
    torch.manual_seed(0)
    lin = nn.Linear(16, 12, bias=bias)
    method, kw, fkw = RECIPES[fmt]
    kw = {k: v for k, v in kw.items() if k != "coupled"}
    mask = sp.prune(lin, method, **kw)["weight"]
    fmt_obj = F.FORMATS[fmt].from_dense(lin.weight.detach(), mask, **fkw)
    x = torch.randn(5, 16)
    b = lin.bias.detach() if bias else None
    ops = torch.ops.sparse_prune
    n = 12
    args = {
        "dense": (ops.dense_linear.default, (x, fmt_obj.values, b)),
        "csr": (ops.csr_linear.default, (x, fmt_obj.values, fmt_obj.crow_indices if fmt == "csr" else None,
                                         getattr(fmt_obj, "col_indices", None), n, b)),
        "bsr": (ops.bsr_linear.default, (x, fmt_obj.values, getattr(fmt_obj, "crow_indices", None),
                                         getattr(fmt_obj, "col_indices", None), n, b)),
        "2:4": (ops.semi24_linear.default, (x, fmt_obj.values, getattr(fmt_obj, "meta", None), b)),
        "shrink": (ops.shrunk_linear.default, (x, fmt_obj.values, getattr(fmt_obj, "out_index", None),
                                               getattr(fmt_obj, "in_index", None), n, b)),
    }[fmt]
    torch.library.opcheck(*args)


@pytest.mark.parametrize("fmt", list(RECIPES))
def test_converted_vit_without_qkv_bias(fmt, images):
    from transformers import ViTConfig, ViTForImageClassification

    torch.manual_seed(0)
    cfg = ViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=64,
                    image_size=32, patch_size=8, num_labels=10, qkv_bias=False)
    model = ViTForImageClassification(cfg).eval()
    method, kw, fkw = RECIPES[fmt]
    masks = sp.prune(model, method, **kw)
    expected = masks.apply(copy.deepcopy(model))(images).logits
    fast = sp.convert(model, masks, format=fmt, **fkw)
    assert fast.vit.layers[0].attention.q_proj.bias is None
    torch.testing.assert_close(fast(images).logits, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("fixture", ["hf_vit", "timm_vit", "tv_vit"])
@pytest.mark.parametrize("fmt", ["csr", "2:4", "bsr"])
def test_mlp_gelu_moves_into_the_first_linear(fixture, fmt, request, images):
    from sparse_prune.structure import gelu_sites

    model = request.getfixturevalue(fixture)
    method, kw, fkw = RECIPES[fmt]
    masks = sp.prune(model, method, **kw)
    sites = gelu_sites(model)
    assert len(sites) == 2  # one MLP per block
    expected = _logits(masks.apply(copy.deepcopy(model))(images))
    fast = sp.convert(model, masks, format=fmt, **fkw)
    for site in sites:
        layer = fast.get_submodule(site.linear)
        assert isinstance(layer, sp.SparseLinear) and layer.activation == "gelu"
        parent = fast.get_submodule(site.parent)
        if isinstance(parent, sp.SparseMLP):  # both Linears sparse: the MLP became one op, no act module
            assert parent.layers()[0] is layer
            continue
        act = parent[int(site.attr)] if isinstance(parent, nn.Sequential) else getattr(parent, site.attr)
        assert isinstance(act, nn.Identity)
    torch.testing.assert_close(_logits(fast(images)), expected, rtol=1e-5, atol=1e-5)
    rows = {r["name"]: r for r in sp.report(fast)}
    # our CPU kernels fuse the exact GELU in their epilogue (the reference applies F.gelu itself)
    assert rows[sites[0].linear]["activation"] == "gelu (fused)"
    plain = sp.convert(model, masks, format=fmt, fuse_activations=False, **fkw)
    assert all(plain.get_submodule(s.linear).activation is None for s in sites)
    torch.testing.assert_close(_logits(plain(images)), expected, rtol=1e-5, atol=1e-5)


def test_activation_argument_is_checked():
    fmt = F.CSR.from_dense(torch.randn(8, 16), torch.rand(8, 16) < 0.5)
    with pytest.raises(ValueError, match="activation must be one of"):
        sp.SparseLinear(fmt, None, activation="relu")
    layer = sp.SparseLinear(fmt, None, activation="gelu")
    x = torch.randn(3, 16)
    torch.testing.assert_close(layer(x), torch.nn.functional.gelu(x @ fmt.to_dense().t()))


@pytest.mark.parametrize("fmt, kw, error", [
    ("bsr", {"block": (0, 4)}, ValueError), ("bsr", {"block": (-4, 4)}, ValueError),
    ("bsr", {"block": (4,)}, ValueError), ("bsr", {"block": "4x4"}, ValueError),
    ("bsr", {"block": (4.0, 4.0)}, ValueError), ("bsr", {"block": (True, 4)}, ValueError),
    ("bsr", {"block": (10**9, 10**9)}, ValueError),
    ("shrink", {"round_to": 0}, ValueError), ("csr", {"index_dtype": torch.int8}, ValueError),
    ("csr", {"bogus": 1}, TypeError),
])
def test_bad_format_arguments_raise_up_front(fmt, kw, error):
    """A bad argument is the caller's error, not a per-layer warning leaving the model dense."""
    model = nn.Sequential(nn.Linear(16, 8))
    masks = sp.prune(model, "l1_unstructured", amount=0.5)
    with pytest.raises(error, match=fmt):
        sp.convert(model, masks, format=fmt, **kw)
