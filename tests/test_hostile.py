"""Hostile inputs (issue 21): every bad argument, state dict, file and command line is refused
with a ValueError/TypeError naming the argument, key or file — no crash, no silent result, and
for files nothing on disk lost. Each table row: the input, the exception type, and a pattern
its message must hold (the argument, key or file it names)."""

import copy
import json
import os
import warnings

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

import sparse_prune as sp
from sparse_prune import agreement, cli
from sparse_prune import formats as F
from sparse_prune.kernels import reference, triton_common


def _mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(16, 8), nn.GELU(), nn.Linear(8, 4)).eval()


def _x(rows=3, k=16):
    return torch.randn(rows, k, generator=torch.Generator().manual_seed(1))


def _quiet(fn, *args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fn(*args, **kwargs)


def _tied():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 8), nn.GELU(), nn.Linear(8, 8), nn.Linear(8, 8)).eval()
    model[3].weight = model[2].weight  # one Parameter in two modules
    return model


def _meta():
    with torch.device("meta"):
        return _mlp()


# ---------------------------------------------------------------------------------------
# Arguments: (case, call, exception, what the message must name)

ARGUMENTS = [
    ("convert inplace='no'", lambda m, ms: sp.convert(m, ms, inplace="no"), TypeError, "inplace"),
    ("convert inplace=1", lambda m, ms: sp.convert(m, ms, inplace=1), TypeError, "inplace"),
    ("convert fuse_activations=None", lambda m, ms: sp.convert(m, ms, fuse_activations=None), TypeError,
     "fuse_activations"),
    ("convert block 1e9", lambda m, ms: sp.convert(m, ms, format="bsr", block=(10**9, 10**9)), ValueError, "block"),
    ("convert masks a dict", lambda m, ms: sp.convert(m, dict(ms)), TypeError, "masks"),
    ("prune block 1e9", lambda m, ms: sp.prune(m, "block", amount=0.5, block=(10**9, 10**9)), ValueError, "block"),
    ("prune Linear(0, n)", lambda m, ms: sp.prune(nn.Sequential(nn.Linear(0, 4)), "l1_unstructured", amount=0.5),
     ValueError, r"0\.weight.*zero-size"),
    ("prune meta model", lambda m, ms: sp.prune(_meta(), "l1_unstructured", amount=0.5), ValueError, "meta"),
    ("convert meta model", lambda m, ms: sp.convert(_meta(), ms), ValueError, "meta"),
    ("convert Linear(0, n)", lambda m, ms: sp.convert(nn.Sequential(nn.Linear(0, 4)),
                                                      sp.MaskSet({"0.weight": torch.ones(4, 0, dtype=torch.bool)})),
     ValueError, "zero-size"),
    ("wanda empty calibration", lambda m, ms: sp.prune(m, "wanda", amount=0.5, calibration=[]), ValueError,
     "calibration is empty"),
    ("wanda 0-token calibration", lambda m, ms: sp.prune(m, "wanda", amount=0.5, calibration=[torch.zeros(0, 16)]),
     ValueError, "0 tokens"),
    ("wanda NaN calibration", lambda m, ms: sp.prune(m, "wanda", amount=0.5,
                                                     calibration=[torch.full((2, 16), float("nan"))]),
     ValueError, "NaN or inf"),
    ("wanda inf calibration", lambda m, ms: sp.prune(m, "wanda", pattern="2:4",
                                                     calibration=[torch.full((2, 16), float("inf"))]),
     ValueError, "NaN or inf"),
    ("block-wanda NaN calibration", lambda m, ms: sp.prune(m, "block", amount=0.5, block=(4, 4), score="wanda",
                                                           calibration=[torch.full((2, 16), float("nan"))]),
     ValueError, "NaN or inf"),
    ("sparsegpt NaN calibration", lambda m, ms: sp.prune(m, "sparsegpt", amount=0.5,
                                                         calibration=[torch.full((2, 16), float("nan"))]),
     ValueError, "^(?!.*percdamp).*NaN or inf"),
    ("sparsegpt 0-token calibration", lambda m, ms: sp.prune(m, "sparsegpt", amount=0.5,
                                                             calibration=[torch.zeros(0, 16)]),
     ValueError, "0 tokens"),
    ("calibration one tensor", lambda m, ms: sp.prune(m, "wanda", amount=0.5, calibration=torch.randn(2, 16)),
     TypeError, r"calibration.*calibration=\[x\]"),
    ("calibration an int", lambda m, ms: sp.prune(m, "wanda", amount=0.5, calibration=5), TypeError, "calibration"),
    ("calibration of strings", lambda m, ms: sp.prune(m, "wanda", amount=0.5, calibration=["x"]), TypeError,
     "calibration batch 0"),
    ("calibration wrong shape", lambda m, ms: sp.prune(m, "wanda", amount=0.5, calibration=[torch.randn(2, 5)]),
     ValueError, r"calibration batch 0 does not fit the model.*\(2, 5\)"),
    ("calibration wrong dtype", lambda m, ms: sp.prune(m, "sparsegpt", amount=0.5,
                                                       calibration=[torch.randn(2, 16).double()]),
     ValueError, "calibration batch 0.*float64"),
    ("example_inputs a list", lambda m, ms: sp.convert(m, ms, format="auto", example_inputs=[_x()]), TypeError,
     "example_inputs"),
    ("example_inputs wrong shape", lambda m, ms: sp.convert(m, ms, format="auto", example_inputs=torch.randn(2, 5)),
     ValueError, "example_inputs batch 0 does not fit"),
    ("two masks, one tied weight", lambda m, ms: sp.MaskSet({"2.weight": torch.ones(8, 8, dtype=torch.bool),
                                                            "3.weight": torch.ones(8, 8, dtype=torch.bool)}).apply(_tied()),
     ValueError, "tied"),
    ("SparseLinear bias dtype", lambda m, ms: sp.SparseLinear(F.Dense.from_dense(torch.randn(4, 8)),
                                                              torch.zeros(4, dtype=torch.int64)), ValueError, "bias"),
    ("SparseLinear bias shape", lambda m, ms: sp.SparseLinear(F.Dense.from_dense(torch.randn(4, 8)), torch.zeros(3)),
     ValueError, "bias"),
    ("SparseLinear bad CSR", lambda m, ms: sp.SparseLinear(F.CSR(torch.ones(2), torch.tensor([0, 1, 2]),
                                                                 torch.tensor([0, 99]), (2, 8)), None),
     ValueError, "col_indices"),
    ("SparseLinear shape of strings", lambda m, ms: sp.SparseLinear(F.Dense(torch.ones(2, 2), ("2", "2")), None),
     ValueError, "shape"),
    ("SparseLinear int values", lambda m, ms: sp.SparseLinear(F.Dense(torch.ones(2, 2, dtype=torch.int32), (2, 2)),
                                                              None), ValueError, "values"),
]


@pytest.mark.parametrize("case, call, exc, names", ARGUMENTS, ids=[a[0] for a in ARGUMENTS])
def test_bad_arguments_are_refused(case, call, exc, names):
    model = _mlp()
    masks = sp.prune(model, "l1_unstructured", amount=0.5)
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(exc, match=names):
        _quiet(call, model, masks)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())  # never half-modified


def test_tied_weights_get_one_mask_and_convert_matches_apply():
    model = _tied()
    masks = sp.prune(model, "l1_unstructured", amount=0.5)
    assert "3.weight" not in masks and "2.weight" in masks  # the name named_parameters() uses
    fast = _quiet(sp.convert, model, masks, format="csr")
    expected = masks.apply(copy.deepcopy(model))(_x())
    torch.testing.assert_close(fast(_x()), expected)  # the tied partner computes with the masked weight


# ---------------------------------------------------------------------------------------
# Empty results warn, naming what matched nothing


@pytest.mark.parametrize("model, kw, says", [
    (nn.Sequential(nn.Conv2d(3, 4, 3)), {}, r"include=\(Linear,\) matched no module"),
    (_mlp(), {"exclude": (nn.Linear,)}, "left out every Linear"),
    (_quiet(sp.convert, _mlp(), sp.prune(_mlp(), "l1_unstructured", amount=0.5), format="csr"), {},
     "already converted"),
])
def test_empty_maskset_warns_why(model, kw, says):
    with pytest.warns(UserWarning, match=says):
        assert len(sp.prune(model, "l1_unstructured", amount=0.5, **kw)) == 0


def test_patterns_that_match_nothing_warn():
    with pytest.warns(UserWarning, match=r"exclude pattern\(s\) \['classifer'\] matched no module"):
        sp.prune(_mlp(), "l1_unstructured", amount=0.5, exclude=("classifer",))
    with pytest.warns(UserWarning, match=r"per_layer pattern\(s\) \['fc_1'\] matched none"):
        sp.prune(_mlp(), "l1_unstructured", amount=0.5, per_layer={"fc_1": 0.9})
    with pytest.warns(UserWarning, match="empty MaskSet"):
        sp.convert(_mlp(), sp.MaskSet())


# ---------------------------------------------------------------------------------------
# State dicts: a tampered array of every format is refused at load_state_dict, naming its key


def _converted(fmt):
    model = _mlp()
    if fmt == "2:4":
        masks = sp.prune(model, "nm")
    elif fmt == "shrink":
        masks = sp.prune(model, "ln_structured", amount=0.5, dim=0)
    else:
        masks = sp.prune(model, "l1_unstructured", amount=0.5)
    return _quiet(sp.convert, model, masks, format=fmt, **({"block": (4, 4)} if fmt == "bsr" else {}))


def _last(value):
    def edit(t):
        t = t.clone()
        t.view(-1)[-1] = value
        return t
    return edit


TAMPER = [
    ("csr", "col_indices", _last(10**6), "col_indices"),
    ("csr", "col_indices", _last(-1), "col_indices"),
    ("csr", "col_indices", lambda t: t.flip(0).contiguous(), "col_indices"),
    ("csr", "crow_indices", _last(10**6), "crow_indices"),
    ("csr", "crow_indices", lambda t: t.flip(0).contiguous(), "crow_indices"),
    ("csr", "col_indices", lambda t: t.long() + 2**32, "col_indices"),  # would wrap to a valid int32
    ("csr", "values", lambda t: t.long(), "values"),
    ("bsr", "col_indices", _last(10**6), "col_indices"),
    ("bsr", "crow_indices", lambda t: t.flip(0).contiguous(), "crow_indices"),
    ("bsr", "values", lambda t: t.int(), "values"),
    ("2:4", "meta", lambda t: torch.full_like(t, -1), "meta"),  # every group (3, 3)
    ("2:4", "meta", lambda t: t.int(), "meta"),
    ("shrink", "out_index", _last(10**6), "out_index"),
    ("shrink", "in_index", lambda t: t.flip(0).contiguous(), "in_index"),
    ("dense", "values", lambda t: t.int(), "values"),
    ("csr", "bias", lambda t: t.long(), "bias"),
]


@pytest.mark.parametrize("assign", [False, True])
@pytest.mark.parametrize("fmt, field, edit, names", TAMPER, ids=[f"{t[0]}-{t[1]}-{i}" for i, t in enumerate(TAMPER)])
def test_tampered_state_dict_is_refused(fmt, field, edit, names, assign):
    fast = _converted(fmt)
    x = _x()
    want = fast(x)
    sd = {k: v.clone() for k, v in fast.state_dict().items()}
    sd[f"0.{field}"] = edit(sd[f"0.{field}"])
    with pytest.raises((ValueError, TypeError), match=rf"0\.{names}"):
        fast.load_state_dict(sd, assign=assign)
    assert torch.equal(fast(x), want)  # the layer kept its arrays


def test_partial_state_dict_is_checked_with_the_arrays_it_keeps():
    fast = _converted("csr")
    bad = fast[0].col_indices.clone()
    bad[-1] = 10**6
    with pytest.raises(ValueError, match="col_indices"):
        fast.load_state_dict({"0.col_indices": bad}, strict=False)


def test_segfault_reproduction_is_refused():
    """Issue 21's crash: the state dict's tensors share storage with the buffers, so editing
    them edits the layer; the load refuses and the kernel checks its indices at forward."""
    c = _converted("csr")
    sd = c.state_dict()
    sd["0.col_indices"][:] = 10**6
    with pytest.raises(ValueError, match="col_indices"):
        c.load_state_dict(sd)
    with pytest.raises(ValueError, match="col_indices"):
        c(_x())


@pytest.mark.skipif(not triton_common.available(), reason="Triton not installed")
def test_load_state_dict_rebinds_prepared_payloads():
    """A valid state dict of another weight of the same sizes: the CSR row schedule (prepared
    once at bind) follows the new arrays, so the output is the new weight's."""
    w = torch.randn(8, 16)
    mask_a = torch.zeros(8, 16, dtype=torch.bool)
    mask_a[0, :8] = True  # row 0 longest
    mask_b = torch.zeros(8, 16, dtype=torch.bool)
    mask_b[7, :8] = True  # row 7 longest, same nnz
    layer = sp.SparseLinear(F.CSR.from_dense(w, mask_a), None, backend="triton")
    other = sp.SparseLinear(F.CSR.from_dense(w, mask_b), None, backend="triton")
    layer.load_state_dict(other.state_dict())
    assert torch.equal(layer.row_order, other.row_order)
    x = _x(4)
    torch.testing.assert_close(layer(x), x @ (w * mask_b).T)


# ---------------------------------------------------------------------------------------
# Files: one error type for bad files, naming the file; nothing on disk lost


def _bad_files(tmp_path, good):
    data = good.read_bytes()
    return {
        "empty": b"",
        "truncated": data[: len(data) // 2],
        "garbage": b"\x00\xffnot a safetensors file" * 10,
        "json": b'{"a": 1}',
        "header only": data[:8],
    }


@pytest.mark.parametrize("kind", ["empty", "truncated", "garbage", "json", "header only"])
def test_bad_mask_files(tmp_path, kind):
    good = tmp_path / "good.safetensors"
    sp.prune(_mlp(), "l1_unstructured", amount=0.5).save(good)
    bad = tmp_path / f"{kind.replace(' ', '_')}.safetensors"
    bad.write_bytes(_bad_files(tmp_path, good)[kind])
    before = bad.read_bytes()
    with pytest.raises(ValueError, match=str(bad)):
        sp.MaskSet.load(bad)
    assert bad.read_bytes() == before
    with pytest.raises(FileNotFoundError):
        sp.MaskSet.load(tmp_path / "missing.safetensors")
    with pytest.raises(ValueError, match=str(tmp_path)):
        sp.MaskSet.load(tmp_path)  # a directory


@pytest.mark.parametrize("meta, names", [
    ({"sparse_prune": "{not json"}, "sparse_prune"),
    ({"sparse_prune_order": '{"a": 1}'}, "sparse_prune_order"),
    ({"sparse_prune_weights": '["x"]'}, "sparse_prune_weights"),
    ({"sparse_prune_weights": '{"weight:nothere": "0.weight"}'}, "nothere"),
])
def test_bad_mask_metadata(tmp_path, meta, names):
    path = tmp_path / "m.safetensors"
    save_file({"0.weight": torch.ones(8, 16, dtype=torch.bool)}, path, metadata=meta)
    with pytest.raises(ValueError, match=names):
        sp.MaskSet.load(path)


@pytest.fixture
def checkpoint(tmp_path):
    fast = _converted("csr")
    sp.save(fast, tmp_path / "ck")
    return tmp_path / "ck"


def _snapshot(directory):
    return {name: (directory / name).read_bytes() for name in sorted(os.listdir(directory))}


@pytest.mark.parametrize("kind", ["empty", "truncated", "garbage", "json", "header only"])
def test_bad_checkpoint_weights(checkpoint, kind):
    weights = checkpoint / "model.safetensors"
    weights.write_bytes(_bad_files(checkpoint, weights)[kind])
    manifest = json.loads((checkpoint / "manifest.json").read_text())
    manifest.pop("weights_token")  # reach the weights file itself
    (checkpoint / "manifest.json").write_text(json.dumps(manifest))
    disk = _snapshot(checkpoint)
    skeleton = _mlp(1)
    before = copy.deepcopy(skeleton.state_dict())
    with pytest.raises(ValueError, match="model.safetensors"):
        sp.load(skeleton, checkpoint)
    assert _snapshot(checkpoint) == disk
    assert all(torch.equal(v, before[k]) for k, v in skeleton.state_dict().items())


def _edit_manifest(edit):
    def run(manifest):
        entry = manifest["sparse_linear"]["0"]
        edit(manifest, entry)
    return run


MANIFEST_EDITS = [
    ("format_version str", lambda m, e: m.update(format_version="1"), "format_version"),
    ("format_version bool", lambda m, e: m.update(format_version=True), "format_version"),
    ("groups not objects", lambda m, e: m.update(groups=[1]), r"groups\[0\]"),
    ("format a list", lambda m, e: e.update(format=["csr"]), "format"),
    ("fields a str", lambda m, e: e.update(fields="values"), "fields"),
    ("fields wrong", lambda m, e: e.update(fields=["values", "crow_indices"]), "fields"),
    ("bias a str", lambda m, e: e.update(bias="yes"), "bias"),
    ("static a str", lambda m, e: e.update(static="8x16"), "static"),
    ("static shape strings", lambda m, e: e["static"].update(shape=["8", "16"]), "shape"),
    ("static extra key", lambda m, e: e["static"].update(block=[4, 4]), "static"),
    ("activation", lambda m, e: e.update(activation="relu"), "activation"),
    ("plan a list", lambda m, e: e.update(plan=[1]), "plan"),
    ("backend a number", lambda m, e: e.update(requested_backend=3), "requested_backend"),
    ("dense_shapes strings", lambda m, e: m["dense_shapes"].update({"0": "8x16"}), "dense_shapes"),
    ("weights_token a number", lambda m, e: m.update(weights_token=5), "weights_token"),
]


@pytest.mark.parametrize("case, edit, names", MANIFEST_EDITS, ids=[m[0] for m in MANIFEST_EDITS])
def test_wrong_manifest_field_types(checkpoint, case, edit, names):
    manifest = json.loads((checkpoint / "manifest.json").read_text())
    _edit_manifest(edit)(manifest)
    (checkpoint / "manifest.json").write_text(json.dumps(manifest))
    skeleton = _mlp(1)
    before = copy.deepcopy(skeleton.state_dict())
    with pytest.raises(ValueError, match=names) as info:
        sp.load(skeleton, checkpoint)
    assert str(checkpoint) in str(info.value)
    assert all(torch.equal(v, before[k]) for k, v in skeleton.state_dict().items())


@pytest.mark.parametrize("key, cast, names", [
    ("0.bias", torch.int64, r"'0\.bias' is torch\.int64"),
    ("0.values", torch.float16, r"'0\.values' is torch\.float16"),
    ("2.bias", torch.float64, r"'2\.bias' is torch\.float64"),
    ("0.crow_indices", torch.float32, "crow_indices"),
])
def test_sp_load_checks_dtypes_against_the_skeleton(checkpoint, key, cast, names):
    """``assign=True`` would take the file's dtype: an int64 bias in a float32 model, fp16 values
    that fail only at forward. Both are refused at load, naming the array."""
    path = checkpoint / "model.safetensors"
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as fh:
        meta = fh.metadata()
    tensors = load_file(path)
    tensors[key] = tensors[key].to(cast)
    save_file(tensors, path, metadata=meta)
    with pytest.raises(ValueError, match=names):
        sp.load(_mlp(1), checkpoint)


def test_a_checkpoint_of_another_dtype_loads_onto_a_cast_skeleton(checkpoint):
    fast = sp.load(_mlp(1), checkpoint)
    sp.save(fast.double(), checkpoint)
    with pytest.raises(ValueError, match=r"skeleton\.to\(torch\.float64\)"):
        sp.load(_mlp(1), checkpoint)
    loaded = sp.load(_mlp(1).double(), checkpoint)
    assert loaded[0].values.dtype == torch.float64 and loaded[0].bias.dtype == torch.float64


def test_save_onto_a_file_keeps_it(tmp_path):
    target = tmp_path / "a_file"
    target.write_text("precious")
    with pytest.raises(FileExistsError, match="a_file"):
        sp.save(_mlp(), target)
    assert target.read_text() == "precious"
    with pytest.raises(FileNotFoundError, match="does not exist"):
        sp.prune(_mlp(), "l1_unstructured", amount=0.5).save(tmp_path / "no_dir" / "m.safetensors")


# ---------------------------------------------------------------------------------------
# The auto cache: a stale or edited entry is measured again, never trusted or fatal


@pytest.mark.parametrize("edit", [
    lambda e: e.update(format="nonsense"),
    lambda e: e.update(format="bsr", backend="torch", kw={"block": [3, 3]}),  # not a candidate
    lambda e: e.update(ratio="fast"),
    lambda e: e.update(ratio=float("nan")),
    lambda e: e.update(kw={"round_to": 0}),
    lambda e: e.clear(),
])
def test_edited_auto_cache_is_remeasured(tmp_path, edit):
    model = _mlp()
    masks = sp.prune(model, "nm")
    cache = tmp_path / "auto.json"
    x = _x(4)
    sp.convert(model, masks, format="auto", example_inputs=x, cache=str(cache))
    store = json.loads(cache.read_text())
    for entry in store.values():
        edit(entry)
    cache.write_text(json.dumps(store))
    fast = sp.convert(model, masks, format="auto", example_inputs=x, cache=str(cache))
    torch.testing.assert_close(fast(x), masks.apply(copy.deepcopy(model))(x))
    stored = json.loads(cache.read_text())
    assert all(isinstance(e.get("ratio"), float) for k, e in stored.items() if "|model|" not in k)  # rewritten
    # whole-model records are keyed by the plans' content: this run's is valid (an edited one
    # under another key is never looked up, and is checked if it ever is)
    assert any("|model|" in k and isinstance(e.get("ratio"), float) for k, e in stored.items())


def test_unreadable_auto_cache_counts_as_empty(tmp_path):
    model = _mlp()
    masks = sp.prune(model, "nm")
    cache = tmp_path / "auto.json"
    cache.write_bytes(b"\xff\xfe{ truncated")
    sp.convert(model, masks, format="auto", example_inputs=_x(4), cache=str(cache))
    assert json.loads(cache.read_text())


# ---------------------------------------------------------------------------------------
# NaN/inf: one rule for every format and backend (sparse_prune.agreement's docstring)


def _backends():
    out = ["torch"]
    if triton_common.available():
        out.append("triton")
    return out


def _nan_problem(fmt, n=16, k=32, dtype=torch.float32, device="cpu", block=(16, 16)):
    g = torch.Generator().manual_seed(0)
    w = torch.randn(n, k, generator=g)
    if fmt == "2:4":
        score = torch.rand(n, k // 4, 4, generator=g)
        mask = torch.zeros_like(score, dtype=torch.bool).scatter_(-1, score.topk(2, dim=-1).indices, True)
        mask = mask.reshape(n, k)
    elif fmt == "shrink":
        mask = (torch.rand(n, 1, generator=g) < 0.6) & (torch.rand(1, k, generator=g) < 0.6)
    else:
        mask = torch.rand(n, k, generator=g) < 0.4
    x = torch.randn(6, k, generator=g)
    x[1, 3] = float("nan")
    x[2, 7] = float("inf")
    x[4, 7] = float("-inf")
    x[4, 9] = float("inf")  # inf - inf on one row: NaN, still not finite
    b = torch.randn(n, generator=g)
    w, mask, x, b = w.to(device, dtype), mask.to(device), x.to(device, dtype), b.to(device, dtype)
    fmt_obj = F.FORMATS[fmt].from_dense(w, mask, **({"block": block} if fmt == "bsr" else {}))
    return fmt_obj, w * mask, x, b


def _check_nan_rule(got, dense, x, bias, what):
    """Lower bound: an output a kept weight connects to a NaN/inf input is not finite. Upper
    bound: outputs of rows whose inputs are finite are finite. The agreement check passes with
    the rule and fails a kernel that loses a NaN or makes one from finite inputs."""
    must = agreement.nonfinite_reach(x, dense)
    assert not got[must].isfinite().any(), f"{what}: a kept weight lost a NaN/inf"
    finite_rows = torch.isfinite(x).all(1)
    assert got[finite_rows].isfinite().all(), f"{what}: finite inputs gave a non-finite output"
    ref = torch.nn.functional.linear(x.double(), dense.double(), bias.double())
    base = torch.nn.functional.linear(x, dense, bias)
    agreement.check_matches(got, ref, base, what, must)
    assert must.any()  # the problem puts a NaN/inf on a kept weight's column
    lost = torch.where(must, torch.zeros_like(got), got)
    with pytest.raises(agreement.Mismatch, match="lost"):
        agreement.check_matches(lost, ref, base, what, must)
    broken = got.clone()
    broken[0, 0] = float("nan")
    with pytest.raises(agreement.Mismatch, match="finite inputs"):
        agreement.check_matches(broken, ref, base, what, must)


@pytest.mark.parametrize("backend", _backends())
@pytest.mark.parametrize("fmt", ["dense", "shrink", "2:4", "csr", "bsr"])
def test_nan_rule(fmt, backend):
    fmt_obj, dense, x, b = _nan_problem(fmt)
    layer = sp.SparseLinear(fmt_obj, b, backend)
    _check_nan_rule(layer(x), dense, x, b, f"{fmt}/{backend}")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("backend", ["auto", "triton", "cuda", "cuda:sm90", "cusparselt"])
@pytest.mark.parametrize("fmt", ["dense", "shrink", "2:4", "csr", "bsr"])
def test_nan_rule_gpu(fmt, backend, dtype):
    """The same rule on every GPU backend that takes the format (128x128 weights: every
    kernel's alignment; 16x16 BSR blocks for Triton)."""
    from sparse_prune import backends

    fmt_obj, dense, x, b = _nan_problem(fmt, 128, 128, dtype, "cuda")
    why = None if backend == "auto" else backends.reason(fmt, backend, fmt_obj, "cuda")
    if why is not None:
        pytest.skip(f"{backend} cannot run {fmt}: {why}")
    layer = sp.SparseLinear(fmt_obj, b, backend)
    _check_nan_rule(layer(x), dense, x, b, f"{fmt}/{layer.backend}/{dtype}")


@pytest.mark.parametrize("fmt", ["shrink", "2:4", "csr", "bsr"])
def test_nan_rule_reference_ops(fmt):
    """The pure-PyTorch references (the oracle and the CPU path without our kernels) follow the
    same rule."""
    g = torch.Generator().manual_seed(2)
    w = torch.randn(8, 16, generator=g)
    mask = (torch.arange(16) % 4 < 2).expand(8, 16).clone() if fmt in ("2:4", "shrink") else torch.rand(8, 16, generator=g) < 0.5
    kw = {"block": (4, 4)} if fmt == "bsr" else {}
    f = F.FORMATS[fmt].from_dense(w, mask, **kw)
    x = torch.randn(3, 16, generator=g)
    x[1, 0] = float("nan")
    if fmt == "csr":
        got = reference.csr_linear(x, f.values, f.crow_indices, f.col_indices, 8, None)
    elif fmt == "bsr":
        got = reference.bsr_linear(x, f.values, f.crow_indices, f.col_indices, 8, None)
    elif fmt == "2:4":
        got = reference.semi24_linear(x, f.values, f.meta, None)
    else:
        got = reference.shrunk_linear(x, f.values, f.out_index, f.in_index, 8, None)
    assert not got[agreement.nonfinite_reach(x, w * mask)].isfinite().any()
    assert got[[0, 2]].isfinite().all()


# ---------------------------------------------------------------------------------------
# The CLI: one line on stderr, non-zero exit, the argument or file named; --debug: traceback

TINY = ["--model", "vit_tiny_patch16_224", "--depth", "1"]


@pytest.fixture(scope="module")
def cli_files(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    masks = root / "m.safetensors"
    assert cli.main(["prune", *TINY, "--method", "l1_unstructured", "--amount", "0.5", "--out", str(masks)]) == 0
    (root / "truncated.safetensors").write_bytes(masks.read_bytes()[:100])
    (root / "garbage.bin").write_bytes(b"not a torch file")
    (root / "a_file").write_text("precious")
    ck = root / "ck"
    assert cli.main(["convert", *TINY, "--masks", str(masks), "--format", "csr", "--out", str(ck)]) == 0
    bad_spec = root / "ck_bad_spec"
    bad_spec.mkdir()
    for name in ("manifest.json", "model.safetensors"):
        (bad_spec / name).write_bytes((ck / name).read_bytes())
    (bad_spec / "model.json").write_text('{"model": "vit_tiny_patch16_224", "depth": "one"}')
    return root


CLI = [
    (["prune", *TINY[:2], "--depth", "-1", "--method", "l1_unstructured"], "--depth"),
    (["bench", "--batch", "0"], "--batch"),
    (["bench", "--reps", "0"], "--reps"),
    (["prune", *TINY, "--method", "l1_unstructured", "--exclude", "["], "regular expression '\\['"),
    (["prune", *TINY, "--method", "l1_unstructured", "--weights", "{root}/garbage.bin"], "garbage.bin"),
    (["prune", *TINY, "--method", "l1_unstructured", "--weights", "{root}/truncated.safetensors"], "truncated"),
    (["prune", *TINY, "--method", "l1_unstructured", "--out", "{root}/no_dir/m.safetensors"], "no_dir"),
    (["convert", *TINY, "--masks", "{root}/truncated.safetensors", "--format", "csr", "--out", "{root}/x"],
     "truncated.safetensors"),
    (["convert", *TINY, "--masks", "{root}/m.safetensors", "--format", "csr", "--out", "{root}/a_file"], "a_file"),
    (["convert", *TINY, "--masks", "{root}/m.safetensors", "--format", "shrink", "--round-to", "0", "--out",
      "{root}/x"], "--round-to"),
    (["convert", *TINY, "--masks", "{root}/m.safetensors", "--format", "bsr", "--block", "0", "4", "--out",
      "{root}/x"], "--block"),
    (["convert", *TINY, "--masks", "{root}/m.safetensors", "--format", "csr", "--batch", "4", "--out", "{root}/x"],
     "--batch and --cache are for --format auto"),
    (["convert", *TINY, "--masks", "{root}/m.safetensors", "--format", "auto", "--batch", "0", "--out", "{root}/x"],
     "--batch"),
    (["report", "{root}/ck_bad_spec"], "model.json"),
    (["report", "{root}/nowhere"], "manifest.json"),
    (["prune", *TINY, "--method", "l1_unstructured", "--amount", "1.5"], "amount"),
]


@pytest.mark.parametrize("argv, names", CLI, ids=[" ".join(c[0][:1] + c[0][-2:]) for c in CLI])
def test_cli_errors_are_one_line(cli_files, capsys, argv, names):
    argv = [a.format(root=cli_files) for a in argv]
    capsys.readouterr()
    try:
        rc = cli.main(argv)
    except SystemExit as exc:  # argparse usage errors exit
        rc = exc.code
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip() and "%|" not in line]
    assert rc not in (0, None)
    assert len(lines) == 1 and lines[0].startswith("sparse-prune: error: "), err
    assert "Traceback" not in err
    assert names in lines[0] or __import__("re").search(names, lines[0]), lines[0]
    assert (cli_files / "a_file").read_text() == "precious"


def test_cli_debug_shows_the_traceback(cli_files):
    with pytest.raises(ValueError, match="truncated.safetensors"):
        cli.main(["--debug", "convert", *TINY, "--masks", str(cli_files / "truncated.safetensors"), "--format",
                  "csr", "--out", str(cli_files / "x")])


# ---------------------------------------------------------------------------------------
# Crash safety with real kills: a child process saving over a good checkpoint is SIGKILLed at
# each step of the save; the directory then loads the old checkpoint or the new one, whole.

_CHILD = r"""
import os, signal, sys
import torch, warnings
from torch import nn
import sparse_prune as sp
from sparse_prune import checkpoint

def mlp(seed):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(16, 8), nn.GELU(), nn.Linear(8, 4)).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return sp.convert(model, sp.prune(model, "l1_unstructured", amount=0.5 if seed else 0.25), format="csr")

step, directory = sys.argv[1], sys.argv[2]
if step == "old":
    sp.save(mlp(0), directory)
    sys.exit(0)
die = lambda: os.kill(os.getpid(), signal.SIGKILL)  # no cleanup, no finally: a real crash
real_save, real_replace = checkpoint.save_file, os.replace
def save_file(tensors, path, metadata=None):
    real_save(tensors, path, metadata=metadata)
    if step == "weights half-written":
        with open(path, "r+b") as fh:
            fh.truncate(os.path.getsize(path) // 2)
        die()
checkpoint.save_file = save_file
replaced = []
def replace(src, dst):
    real_replace(src, dst)
    replaced.append(dst)
    if (step, len(replaced)) in (("between the renames", 1), ("after both renames", 2)):
        die()
os.replace = replace
if step == "before any rename":
    sp.atomic.commit = lambda tmp, path: die()
sp.save(mlp(1), directory)
"""


@pytest.mark.parametrize("step", ["weights half-written", "before any rename", "between the renames",
                                  "after both renames", "not killed"])
def test_save_killed_at_each_step_leaves_a_whole_checkpoint(tmp_path, step):
    import signal
    import subprocess
    import sys

    script = tmp_path / "child.py"
    script.write_text(_CHILD)
    ck = tmp_path / "ck"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([os.getcwd(), os.environ.get("PYTHONPATH", "")])}
    run = lambda which: subprocess.run([sys.executable, str(script), which, str(ck)], env=env,  # noqa: E731
                                       capture_output=True, text=True, timeout=300)
    assert run("old").returncode == 0
    old = sp.load(_mlp(5), ck)
    child = run(step)
    assert child.returncode == (0 if step == "not killed" else -signal.SIGKILL), child.stderr
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loaded = sp.load(_mlp(5), ck)
    x = _x()
    old_out, new_out = old(x), loaded(x)
    is_old = torch.equal(new_out, old_out)
    expected_old = step in ("weights half-written", "before any rename")
    assert is_old == expected_old, f"{step}: loaded the {'old' if is_old else 'new'} checkpoint"
    if not is_old:  # the new one, whole: its masks are the 50% ones
        assert loaded[0].values.numel() == 64
