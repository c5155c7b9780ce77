"""``sparse_prune::sparse_mlp`` on our CPU kernels (fc1's epilogue writes fc2's input panels) and
``SparseMLP``, the module ``convert`` puts in place of a ViT MLP.

The fused op must give the same numbers as the two linear ops in a row: bitwise on the x86
paths (the same product, bias and GELU code, only the layout in between differs), and within
the agreement rule of the fp64 masked dense MLP, for every pair of formats, odd shapes (tokens
past a tile, a hidden width a bsr block overhangs, empty rows), every ISA and 1 or 2 threads.
"""

import copy

import pytest
import torch
import torch.nn.functional as Fn

import sparse_prune as sp
from sparse_prune import agreement, ops
from sparse_prune import formats as F
from sparse_prune.convert import fuse_gelu
from sparse_prune.nn import SparseLinear, SparseMLP

pytestmark = pytest.mark.skipif(not ops.has_cpu_extension(),
                                reason=f"CPU kernels not built: {ops.cpu_extension_error()}")

FORMATS = ["csr", "bsr", "2:4"]
# (tokens, in, hidden, out): one token; a last tile of 5; 197 (two AVX-512 tiles); hidden 200
# with a (4, 3) bsr block (67 block columns: one padding row) and out 1; in > hidden > out, both
# over 256 rows (several row blocks, each layer's segment kernel with sub-blocks outer)
SHAPES = [(1, 16, 32, 8), (21, 24, 40, 12), (197, 64, 200, 48), (5, 32, 200, 1), (197, 700, 520, 300)]
ARRAYS = {"csr": ("values", "crow_indices", "col_indices"), "bsr": ("values", "crow_indices", "col_indices"),
          "2:4": ("values", "meta")}


@pytest.fixture(params=["avx512", "avx2", "portable"])
def isa(request, monkeypatch):
    if request.param not in ops.cpu_isas():
        pytest.skip(f"this CPU (or build) cannot run {request.param}")
    monkeypatch.setenv("SPARSE_PRUNE_CPU_ISA", request.param)
    return request.param


def _weight(n, k, kind, seed, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g)
    if kind == "2:4":
        keep = torch.zeros(n, k // 4, 4, dtype=torch.bool)
        keep.scatter_(-1, torch.rand(n, k // 4, 4, generator=g).argsort(-1)[..., :2], True)
        return F.SemiStructured.from_dense(w.to(dtype), keep.reshape(n, k))
    mask = torch.rand(n, k, generator=g) < 0.35
    if n > 2:
        mask[1] = False  # an empty row
    if kind == "csr":
        return F.CSR.from_dense(w.to(dtype), mask)
    return F.BSR.from_dense(w.to(dtype), mask, block=(4, 3))


def _arrays(fmt, kind):
    return [getattr(fmt, a) for a in ARRAYS[kind]]


def _mlp(x, k1, f1, b1, k2, f2, b2, gelu=True):
    return torch.ops.sparse_prune.sparse_mlp(x, k1, _arrays(f1, k1), b1, f1.shape[0], k2, _arrays(f2, k2), b2,
                                             f2.shape[0], gelu)


def _two_ops(x, k1, f1, b1, k2, f2, b2, gelu=True):
    h = ops._sparse_linear_call(x, k1, _arrays(f1, k1), b1, f1.shape[0], gelu)
    return ops._sparse_linear_call(h, k2, _arrays(f2, k2), b2, f2.shape[0], False)


@pytest.mark.parametrize("k1", FORMATS)
@pytest.mark.parametrize("k2", FORMATS)
@pytest.mark.parametrize("m, k, h, n", SHAPES)
def test_fused_mlp_matches_two_ops_and_dense(isa, no_reference, k1, k2, m, k, h, n):
    f1, f2 = _weight(h, k, k1, 1), _weight(n, h, k2, 2)
    g = torch.Generator().manual_seed(3)
    x, b1, b2 = torch.randn(m, k, generator=g), torch.randn(h, generator=g), torch.randn(n, generator=g)
    got = _mlp(x, k1, f1, b1, k2, f2, b2)
    two = _two_ops(x, k1, f1, b1, k2, f2, b2)
    if isa == "portable":
        torch.testing.assert_close(got, two, rtol=1e-6, atol=1e-6)
    else:
        assert torch.equal(got, two)
    w1, w2 = f1.to_dense(), f2.to_dense()
    ref = Fn.linear(Fn.gelu(Fn.linear(x.double(), w1.double(), b1.double())), w2.double(), b2.double())
    agreement.check_matches(got, ref, Fn.linear(Fn.gelu(Fn.linear(x, w1, b1)), w2, b2))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16, torch.bfloat16])
def test_fused_mlp_other_dtypes(no_reference, dtype):
    f1, f2 = _weight(40, 24, "csr", 1, dtype), _weight(12, 40, "bsr", 2, dtype)
    x = torch.randn(21, 24).to(dtype)
    got = _mlp(x, "csr", f1, None, "bsr", f2, None)
    assert got.dtype == dtype and got.shape == (21, 12)
    ref = Fn.linear(Fn.gelu(Fn.linear(x.double(), f1.to_dense().double())), f2.to_dense().double())
    agreement.check_matches(got, ref, Fn.linear(Fn.gelu(Fn.linear(x, f1.to_dense())), f2.to_dense()))


def test_fused_mlp_without_gelu_no_tokens_and_threads(isa):
    f1, f2 = _weight(200, 64, "2:4", 1), _weight(48, 200, "csr", 2)
    x = torch.randn(197, 64)
    assert torch.equal(_mlp(x, "2:4", f1, None, "csr", f2, None, gelu=False),
                       _two_ops(x, "2:4", f1, None, "csr", f2, None, gelu=False))
    assert _mlp(x[:0], "2:4", f1, None, "csr", f2, None).shape == (0, 48)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = _mlp(x, "2:4", f1, None, "csr", f2, None)
        torch.set_num_threads(2)
        two = _mlp(x, "2:4", f1, None, "csr", f2, None)
    finally:
        torch.set_num_threads(before)
    assert torch.equal(one, two)


@pytest.mark.parametrize("split", ["rows", "tokens"])
@pytest.mark.parametrize("k1, k2", [("csr", "bsr"), ("bsr", "2:4"), ("2:4", "csr")])
def test_fused_mlp_token_split_bitwise_equal_to_one_thread(isa, no_reference, monkeypatch, split, k1, k2):
    """With the token split each worker runs its pieces of both layers (a tile on a cut shared by
    units, its hidden panel written by both): the result is still the one-thread one, bit for
    bit."""
    f1, f2 = _weight(200, 64, k1, 1), _weight(37, 200, k2, 2)  # fc2 bsr (4x3 blocks) overhangs 200
    g = torch.Generator().manual_seed(4)
    x, b1, b2 = torch.randn(531, 64, generator=g), torch.randn(200, generator=g), torch.randn(37, generator=g)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = _mlp(x, k1, f1, b1, k2, f2, b2)
        _mlp(1 - x, k1, f1, b1, k2, f2, b2)  # other values in the reused hidden scratch
        monkeypatch.setenv("SPARSE_PRUNE_CPU_SPLIT", split)
        torch.set_num_threads(2)
        two = _mlp(x, k1, f1, b1, k2, f2, b2)
    finally:
        torch.set_num_threads(before)
    assert torch.equal(one, two)
    if isa != "portable":
        assert torch.equal(two, _two_ops(x, k1, f1, b1, k2, f2, b2))


def test_fused_mlp_tile_shared_by_row_blocks_bitwise_equal_to_one_thread(isa, no_reference, monkeypatch):
    """Hidden 600 (three 256-row blocks of fc1's segment layout) and M = 197: the token split's
    cut falls inside a tile, whose hidden panel fc1's two workers then write in parts."""
    f1, f2 = _weight(600, 64, "csr", 1), _weight(37, 600, "2:4", 2)
    g = torch.Generator().manual_seed(5)
    x, b1, b2 = torch.randn(197, 64, generator=g), torch.randn(600, generator=g), torch.randn(37, generator=g)
    monkeypatch.setenv("SPARSE_PRUNE_CPU_SPLIT", "tokens")
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = _mlp(x, "csr", f1, b1, "2:4", f2, b2)
        _mlp(1 - x, "csr", f1, b1, "2:4", f2, b2)  # other values in the reused hidden scratch
        torch.set_num_threads(2)
        two = _mlp(x, "csr", f1, b1, "2:4", f2, b2)
    finally:
        torch.set_num_threads(before)
    assert torch.equal(one, two)
    ref = Fn.linear(Fn.gelu(Fn.linear(x.double(), f1.to_dense().double(), b1.double())), f2.to_dense().double(),
                    b2.double())
    agreement.check_matches(two, ref, Fn.linear(Fn.gelu(Fn.linear(x, f1.to_dense(), b1)), f2.to_dense(), b2))


def test_fused_mlp_bad_arguments_raise():
    f1, f2 = _weight(40, 24, "csr", 1), _weight(12, 40, "csr", 2)
    x = torch.randn(3, 24)
    a1, a2 = _arrays(f1, "csr"), _arrays(f2, "csr")
    with pytest.raises(ValueError, match="fc1 format must be 'csr', 'bsr' or '2:4'"):
        torch.ops.sparse_prune.sparse_mlp(x, "coo", a1, None, 40, "csr", a2, None, 12, True)
    with pytest.raises(ValueError, match="fc2 .* takes 3 tensors"):
        torch.ops.sparse_prune.sparse_mlp(x, "csr", a1, None, 40, "csr", a2[:2], None, 12, True)
    with pytest.raises(ValueError, match="crow_indices must have 41 entries"):
        torch.ops.sparse_prune.sparse_mlp(x, "csr", [a1[0], a1[1][:-1], a1[2]], None, 40, "csr", a2, None, 12, True)
    bad = a2[2].clone()
    bad[-1] = 40  # a column of fc2 past the hidden width (still sorted)
    with pytest.raises(ValueError, match="col_indices hold a column outside"):
        torch.ops.sparse_prune.sparse_mlp(x, "csr", a1, None, 40, "csr", [a2[0], a2[1], bad], None, 12, True)
    with pytest.raises(ValueError, match="bias must be"):
        torch.ops.sparse_prune.sparse_mlp(x, "csr", a1, torch.zeros(3), 40, "csr", a2, None, 12, True)


def test_fused_mlp_opcheck_compile_export():
    f1, f2 = _weight(40, 24, "csr", 1), _weight(12, 40, "2:4", 2)
    x, b1, b2 = torch.randn(9, 24), torch.randn(40), torch.randn(12)
    torch.library.opcheck(torch.ops.sparse_prune.sparse_mlp.default,
                          (x, "csr", _arrays(f1, "csr"), b1, 40, "2:4", _arrays(f2, "2:4"), b2, 12, True))
    mlp = SparseMLP(SparseLinear(f1, b1, activation="gelu"), SparseLinear(f2, b2))
    eager = mlp(x)
    torch.testing.assert_close(torch.compile(mlp, backend="inductor", fullgraph=True)(x), eager)
    torch.testing.assert_close(torch.export.export(mlp, (x,)).module()(x), eager)


# ---------------------------------------------------------------------------------------
# SparseMLP in a converted model.

def _vit(source):
    kw = dict(num_hidden_layers=2, hidden_size=64, num_attention_heads=4, intermediate_size=128, image_size=32,
              patch_size=8) if source == "transformers" else {}
    if source == "timm":
        kw = dict(depth=2, embed_dim=64, num_heads=4, img_size=32, patch_size=8)
    if source == "torchvision":
        kw = dict(num_layers=2, hidden_dim=64, num_heads=4, mlp_dim=128, image_size=32, patch_size=8)
    try:
        return sp.models.vit("vit_base_patch16_224", source=source, **kw).eval()
    except ImportError as exc:
        pytest.skip(f"{source} is not installed: {exc}")


@pytest.mark.parametrize("source", ["transformers", "timm", "torchvision"])
@pytest.mark.parametrize("fmt", ["csr", "2:4"])
def test_convert_fuses_vit_mlps(source, fmt):
    model = _vit(source)
    method = ("nm", {"pattern": "2:4"}) if fmt == "2:4" else ("l1_unstructured", {"amount": 0.7})
    masks = sp.prune(model, method[0], exclude=("classifier", "head", "heads"), **method[1])
    fused = sp.convert(model, masks, format=fmt)
    plain = sp.convert(model, masks, format=fmt, fuse_activations=False)
    fuse_gelu(plain)  # the GELU inside fc1, but no SparseMLP
    mlps = [m for m in fused.modules() if isinstance(m, SparseMLP)]
    assert len(mlps) == 2 and not any(isinstance(m, SparseMLP) for m in plain.modules())
    assert fused.state_dict().keys() == plain.state_dict().keys()
    x = torch.randn(2, 3, 32, 32)
    with torch.inference_mode():
        out = lambda m: m(x).logits if source == "transformers" else m(x)  # noqa: E731
        assert all(m.fused(torch.zeros(1)) for m in mlps)
        assert torch.equal(out(fused), out(plain))
        ref = out(masks.apply(copy.deepcopy(model)))
    torch.testing.assert_close(out(fused), ref, rtol=1e-4, atol=1e-4)
    rows = sp.report(fused)
    assert len([r for r in rows if r["format"] == fmt]) >= 4
    mlp_rows = [r for r in rows if r.get("mlp") == "sparse_mlp"]
    assert len(mlp_rows) == 4 and all(r["name"].endswith(("fc1", "fc2", ".0", ".3")) for r in mlp_rows)
    assert "[sparse_mlp]" in sp.format_report(rows)
    assert not any("mlp" in r for r in sp.report(plain))


def test_sparse_mlp_is_saved_and_loaded_fused(tmp_path):
    model = _vit("transformers")
    masks = sp.prune(model, "l1_unstructured", amount=0.6, exclude=("classifier",))
    fused = sp.convert(model, masks, format="csr")
    sp.save(fused, tmp_path / "ckpt")
    loaded = sp.load(_vit("transformers"), tmp_path / "ckpt")
    assert sum(isinstance(m, SparseMLP) for m in loaded.modules()) == 2
    x = torch.randn(1, 3, 32, 32)
    with torch.inference_mode():
        assert torch.equal(loaded(x).logits, fused(x).logits)


def test_sparse_mlp_falls_back_where_the_fused_op_cannot_run():
    f1, f2 = _weight(40, 24, "csr", 1), _weight(12, 40, "csr", 2)
    dense1 = F.Dense.from_dense(f1.to_dense())  # a format the fused op does not take
    mlp = SparseMLP(SparseLinear(dense1, None, activation="gelu"), SparseLinear(f2, None))
    x = torch.randn(5, 24)
    assert not mlp.fused(x)
    fc1, fc2 = mlp.layers()
    torch.testing.assert_close(mlp(x), fc2(fc1(x)))
    with pytest.raises(ValueError, match="activation='gelu'"):
        SparseMLP(SparseLinear(f1, None), SparseLinear(f2, None))
    with pytest.raises(ValueError, match="must equal fc2.in_features"):
        SparseMLP(SparseLinear(f1, None, activation="gelu"), SparseLinear(_weight(12, 41, "csr", 2), None))
    with pytest.raises(TypeError, match="must be SparseLinear"):
        SparseMLP(torch.nn.Linear(24, 40), SparseLinear(f2, None))


def test_mlp_with_dropout_on_is_not_fused():
    model = _vit("timm")
    model.blocks[0].mlp.drop1.p = 0.1
    masks = sp.prune(model, "l1_unstructured", amount=0.5, exclude=("head",))
    fused = sp.convert(model, masks, format="csr")
    assert not isinstance(fused.blocks[0].mlp, SparseMLP) and isinstance(fused.blocks[1].mlp, SparseMLP)
