"""Pruners against torch.nn.utils.prune and their own promises (counts, seeds, patterns)."""

import copy
import math

import pytest
import torch
from torch import nn
from torch.nn.utils import prune as tp

import sparse_prune as sp

SHAPES = [(197, 5), (5, 123), (64, 48), (1, 7)]
AMOUNTS = [0.0, 0.1, 0.3, 0.5, 0.77, 1.0, 0, 3]


def _linear(shape, ties=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    lin = nn.Linear(shape[1], shape[0])
    with torch.no_grad():
        w = torch.randint(-3, 4, shape, generator=g).float() if ties else torch.randn(shape, generator=g)
        lin.weight.copy_(w)
    return lin


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("amount", AMOUNTS)
@pytest.mark.parametrize("ties", [False, True])
def test_l1_unstructured_matches_torch(shape, amount, ties):
    lin = _linear(shape, ties)
    ours = sp.prune(lin, "l1_unstructured", amount=amount)["weight"]
    ref = copy.deepcopy(lin)
    tp.l1_unstructured(ref, "weight", amount=amount)
    assert torch.equal(ours, ref.weight_mask.bool())


@pytest.mark.parametrize("shape", [(197, 5), (5, 123), (16, 16)])
@pytest.mark.parametrize("n", [1, 2, 3, 0.5, math.inf, -math.inf, "fro"])
@pytest.mark.parametrize("dim", [0, 1, -1])
@pytest.mark.parametrize("amount", [0.0, 0.4, 1.0, 2])
@pytest.mark.parametrize("ties", [False, True])
def test_ln_structured_matches_torch(shape, n, dim, amount, ties):
    lin = _linear(shape, ties)
    ours = sp.prune(lin, "ln_structured", amount=amount, n=n, dim=dim)["weight"]
    ref = copy.deepcopy(lin)
    tp.ln_structured(ref, "weight", amount=amount, n=n, dim=dim)
    assert torch.equal(ours, ref.weight_mask.bool())


@pytest.mark.parametrize("dim", [0, 1, 2, 3, -1])
def test_ln_structured_conv_matches_torch(dim):
    conv = nn.Conv2d(5, 6, 3)
    ours = sp.prune(conv, "ln_structured", amount=0.5, n=1, dim=dim, include=(nn.Conv2d,))["weight"]
    tp.ln_structured(conv, "weight", amount=0.5, n=1, dim=dim)
    assert torch.equal(ours, conv.weight_mask.bool())


def _three_layers(ties=False):
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(7, 13), nn.ReLU(), nn.Linear(13, 5), nn.LayerNorm(5), nn.Linear(5, 3))
    if ties:
        with torch.no_grad():
            for m in model:
                if isinstance(m, nn.Linear):
                    m.weight.copy_(torch.randint(-2, 3, m.weight.shape).float())
    return model


@pytest.mark.parametrize("amount", [0.0, 0.25, 0.6, 1.0, 40])
@pytest.mark.parametrize("ties", [False, True])
def test_global_l1_matches_torch(amount, ties):
    model = _three_layers(ties)
    ours = sp.prune(model, "l1_unstructured", amount=amount, scope="global")
    ref = copy.deepcopy(model)
    params = [(m, "weight") for m in ref if isinstance(m, nn.Linear)]
    tp.global_unstructured(params, pruning_method=tp.L1Unstructured, amount=amount)
    theirs = sp.MaskSet.from_model(ref)
    assert list(ours) == ["0.weight", "2.weight", "4.weight"] == list(theirs)
    for name in ours:
        assert torch.equal(ours[name], theirs[name]), name


@pytest.mark.parametrize("amount", [0.0, 0.3, 0.5, 1.0, 17])
@pytest.mark.parametrize("shape", SHAPES)
def test_random_unstructured_exact_count_and_seeded(amount, shape):
    lin = _linear(shape)
    numel = lin.weight.numel()
    if isinstance(amount, int) and amount > numel:
        with pytest.raises(ValueError, match="larger than"):
            sp.prune(lin, "random_unstructured", amount=amount)
        return
    torch.manual_seed(123)
    a = sp.prune(lin, "random_unstructured", amount=amount, seed=7)["weight"]
    torch.manual_seed(999)  # the global RNG must not matter
    torch.rand(10)
    b = sp.prune(lin, "random_unstructured", amount=amount, seed=7)["weight"]
    expected = amount if isinstance(amount, int) else round(amount * numel)
    assert int((~a).sum()) == expected
    assert torch.equal(a, b)


def test_random_seeds_differ():
    lin = _linear((64, 64))
    a = sp.prune(lin, "random_unstructured", amount=0.5, seed=0)["weight"]
    b = sp.prune(lin, "random_unstructured", amount=0.5, seed=1)["weight"]
    assert not torch.equal(a, b)


@pytest.mark.parametrize("dim", [0, 1, -2])
@pytest.mark.parametrize("amount", [0.0, 0.35, 1.0, 2])
def test_random_structured_exact_count(dim, amount):
    lin = _linear((197, 5))
    m = sp.prune(lin, "random_structured", amount=amount, dim=dim, seed=3)["weight"]
    d = dim % 2
    units = lin.weight.shape[d]
    dead = (~m).all(dim=1 - d)
    assert int(dead.sum()) == (amount if isinstance(amount, int) else round(amount * units))
    # whole units only: every unit is all-kept or all-pruned
    assert torch.equal(m.all(dim=1 - d), ~dead)
    assert torch.equal(m, sp.prune(lin, "random_structured", amount=amount, dim=dim, seed=3)["weight"])


@pytest.mark.parametrize("pattern", ["2:4", "1:4", "4:8", (1, 2), "3:5"])
@pytest.mark.parametrize("rows", [1, 5, 37])
def test_nm_keeps_largest_n_of_every_m(pattern, rows):
    n, m = sp.pruning.parse_pattern(pattern)
    k = m * 6
    lin = _linear((rows, k), ties=True)
    mask = sp.prune(lin, "nm", pattern=pattern)["weight"]
    groups = mask.view(rows, k // m, m)
    assert (groups.sum(-1) == n).all()
    w = lin.weight.detach().abs().view(rows, k // m, m)
    kept_min = torch.where(groups, w, torch.inf).amin(-1)
    dropped_max = torch.where(~groups, w, -torch.inf).amax(-1)
    assert (kept_min >= dropped_max).all()


def test_nm_conv_flattens_to_gemm_rows():
    conv = nn.Conv2d(4, 8, 2)  # K = 4*2*2 = 16
    mask = sp.prune(conv, "nm", include=(nn.Conv2d,))["weight"]
    assert mask.shape == conv.weight.shape
    assert (mask.reshape(8, 4, 4).sum(-1) == 2).all()


def _wanda_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 6), nn.ReLU(), nn.Linear(6, 4))


def test_wanda_scores_weights_by_input_norm():
    model = _wanda_model()
    x = torch.randn(32, 8)
    x[:, 3] *= 100.0  # column 3 of layer 0 dominates: it must survive in every row
    masks = sp.prune(model, "wanda", amount=0.5, calibration=[x[:16], x[16:]])
    m0 = masks["0.weight"]
    assert m0[:, 3].all()
    assert ((~m0).sum(1) == 4).all()  # exact per-row counts
    # the same ranking computed by hand
    norm = x.pow(2).sum(0).sqrt()
    score = model[0].weight.detach().abs() * norm
    expected = torch.ones_like(m0)
    expected.scatter_(1, score.topk(4, dim=1, largest=False).indices, False)
    assert torch.equal(m0, expected)


def test_wanda_nm_pattern_and_hooks_removed():
    model = _wanda_model().train()
    before = copy.deepcopy(model.state_dict())
    masks = sp.prune(model, "wanda", pattern="2:4", calibration=[torch.randn(5, 8)],
                     exclude=(r"^2$",))
    assert list(masks) == ["0.weight"]
    assert (masks["0.weight"].view(6, 2, 4).sum(-1) == 2).all()
    assert model.training
    assert all(not m._forward_hooks for m in model.modules())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_wanda_on_vit_with_dict_calibration(hf_vit, images):
    masks = sp.prune(hf_vit, "wanda", amount=0.5, calibration=[{"pixel_values": images}])
    assert abs(masks.sparsity() - 0.5) < 1e-6


def test_scope_global_random_total_count():
    model = _three_layers()
    masks = sp.prune(model, "random_unstructured", amount=0.5, scope="global", seed=0)
    total = sum(m.numel() for m in masks.values())
    assert sum(int((~m).sum()) for m in masks.values()) == round(0.5 * total)


def test_global_structured_normalises_unit_size():
    # Same per-element distribution, rows of length 4 and 40: raw L2 norms would put every
    # short row first (~2 vs ~6.3); the size-normalised ranking prunes rows from both layers.
    model = nn.Sequential(nn.Linear(4, 10), nn.Linear(40, 10))
    with torch.no_grad():
        g = torch.Generator().manual_seed(0)
        for m in model:
            m.weight.copy_(torch.randn(m.weight.shape, generator=g))
    masks = sp.prune(model, "ln_structured", amount=0.5, n=2, dim=0, scope="global",
                     include_classifier=True)  # the second Linear is the output layer
    dead = [int((~m.any(1)).sum()) for m in masks.values()]
    assert sum(dead) == 10
    assert 0 < dead[0] < 10 and 0 < dead[1] < 10
    # every dead row scores lower than every live row, after normalisation
    scores = torch.cat([m.weight.detach().norm(dim=1) / m.in_features ** 0.5 for m in model])
    alive = torch.cat([m.any(1) for m in masks.values()])
    assert scores[~alive].max() <= scores[alive].min()


def test_per_layer_and_exclude():
    model = _three_layers()
    masks = sp.prune(model, "l1_unstructured", amount=0.5, per_layer={r"^2\.": 0.9},
                     exclude=("4",))
    assert list(masks) == ["0.weight", "2.weight"]
    assert masks.layer_sparsity()["2.weight"] == pytest.approx(round(0.9 * 65) / 65)
    assert masks.layer_sparsity()["0.weight"] == pytest.approx(round(0.5 * 91) / 91)
    by_type = sp.prune(model, "l1_unstructured", amount=0.5, exclude=(nn.Linear,))
    assert len(by_type) == 0


def test_per_layer_under_global_scope_is_local():
    model = _three_layers()
    masks = sp.prune(model, "l1_unstructured", amount=0.5, scope="global", per_layer={"^4": 0.2})
    assert masks.layer_sparsity()["4.weight"] == pytest.approx(round(0.2 * 15) / 15)
    pooled = [masks["0.weight"], masks["2.weight"]]
    total = sum(m.numel() for m in pooled)
    assert sum(int((~m).sum()) for m in pooled) == round(0.5 * total)


def test_include_conv_and_biases_never_pruned(hf_vit):
    masks = sp.prune(hf_vit, "l1_unstructured", amount=0.3, include=(nn.Linear, nn.Conv2d))
    assert any("patch_embeddings" in k for k in masks)
    assert all(k.endswith(".weight") for k in masks)
    assert not any("layernorm" in k.lower() or "norm" in k.split(".")[-2] for k in masks)


@pytest.mark.parametrize("method", sp.METHODS)
def test_model_never_modified(method, hf_vit, images):
    before = copy.deepcopy(hf_vit.state_dict())
    kw = {"calibration": [images]} if method in ("wanda", "sparsegpt") else {}
    if method != "nm":
        kw["amount"] = 0.5
    sp.prune(hf_vit, method, **kw)
    after = hf_vit.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)


# ----------------------------------------------------------------------------------------
# Bad input: clear errors naming the argument


@pytest.mark.parametrize(
    "kwargs, exc, words",
    [
        ({"amount": "half"}, TypeError, "amount"),
        ({"amount": None}, TypeError, "amount"),
        ({"amount": True}, TypeError, "amount"),
        ({"amount": float("nan")}, ValueError, "amount"),
        ({"amount": float("inf")}, ValueError, "amount"),
        ({"amount": 1.5}, ValueError, "[0, 1]"),
        ({"amount": -0.1}, ValueError, "[0, 1]"),
        ({"amount": -3}, ValueError, ">= 0"),
        ({"amount": 10_000}, ValueError, "larger than"),
        ({"amount": 0.5, "scope": "everywhere"}, ValueError, "scope"),
        ({"amount": 0.5, "per_layer": {"x": 2.0}}, ValueError, "per_layer"),
        ({"amount": 0.5, "per_layer": {"(": 0.1}}, ValueError, "regex"),
        ({"amount": 0.5, "include": (nn.LayerNorm,)}, ValueError, "never pruned"),
        ({"amount": 0.5, "include": ("Linear",)}, TypeError, "include"),
        ({"amount": 0.5, "exclude": (3,)}, TypeError, "exclude"),
        ({"amount": 0.5, "seed": 1.5}, TypeError, "seed"),
        ({"amount": 0.5, "coupled": True}, ValueError, "coupled"),
        ({"amount": 0.5, "pattern": "2:4"}, ValueError, "pattern"),
    ],
)
def test_bad_arguments(kwargs, exc, words):
    with pytest.raises(exc, match=words.replace("[", r"\[").replace("]", r"\]")):
        sp.prune(_three_layers(), "l1_unstructured", **kwargs)


def test_unknown_method_lists_valid_ones():
    with pytest.raises(ValueError, match="unknown method 'l3'.*l1_unstructured.*wanda"):
        sp.prune(_three_layers(), "l3", amount=0.5)


@pytest.mark.parametrize("dim", [2, -3, 10])
def test_dim_out_of_range(dim):
    with pytest.raises(ValueError, match="dim"):
        sp.prune(_three_layers(), "ln_structured", amount=0.5, dim=dim)


@pytest.mark.parametrize("n", ["nuc", "abc", None, float("nan"), True])
def test_bad_norm(n):
    with pytest.raises(ValueError, match="n must be"):
        sp.prune(_three_layers(), "ln_structured", amount=0.5, n=n)


@pytest.mark.parametrize("pattern", ["4:2", "2:2", "0:4", "2-4", "a:b", (2,), (2.0, 4), "2:4:8"])
def test_bad_pattern(pattern):
    with pytest.raises(ValueError, match="pattern"):
        sp.prune(_three_layers(), "nm", pattern=pattern)


def test_nm_in_features_not_divisible():
    with pytest.raises(ValueError, match="not divisible by M = 4"):
        sp.prune(nn.Linear(7, 3), "nm")


def test_nm_rejects_amount_and_global():
    with pytest.raises(ValueError, match="pattern"):
        sp.prune(nn.Linear(8, 3), "nm", amount=0.5)
    with pytest.raises(ValueError, match="local"):
        sp.prune(nn.Linear(8, 3), "wanda", amount=0.5, scope="global", calibration=[torch.randn(2, 8)])


def test_structured_on_1d_weight():
    class OneD(nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = nn.Parameter(torch.randn(5))

    with pytest.raises(ValueError, match="1-D"):
        sp.prune(nn.Sequential(OneD()), "ln_structured", amount=0.5, include=(OneD,))


def test_wanda_calibration_errors():
    with pytest.raises(ValueError, match="calibration"):
        sp.prune(_wanda_model(), "wanda", amount=0.5)
    with pytest.raises(ValueError, match="empty"):
        sp.prune(_wanda_model(), "wanda", amount=0.5, calibration=[])
    with pytest.raises(ValueError, match="either"):
        sp.prune(_wanda_model(), "wanda", amount=0.5, pattern="2:4", calibration=[torch.randn(2, 8)])


def test_wanda_torchvision_out_proj_matches_manual_norm(tv_vit, images):
    """nn.MultiheadAttention never calls out_proj; its input norm is recomputed exactly."""
    mha = tv_vit.encoder.layers[0].self_attention
    captured = {}

    def grab(module, args, output):
        captured["x"] = output.detach()

    h = tv_vit.encoder.layers[0].ln_1.register_forward_hook(grab)
    with torch.no_grad():
        tv_vit(images)
    h.remove()
    x = captured["x"]
    eye = torch.eye(mha.embed_dim)
    # the attention output before out_proj, by hand
    with torch.no_grad():
        pre = nn.functional.multi_head_attention_forward(
            x.transpose(0, 1), x.transpose(0, 1), x.transpose(0, 1), mha.embed_dim, mha.num_heads,
            mha.in_proj_weight, mha.in_proj_bias, None, None, False, 0.0, eye, torch.zeros(mha.embed_dim),
            training=False, need_weights=False)[0]
    targets = sp.pruning.collect_targets(tv_vit)
    norms = sp.pruning.input_norms(tv_vit, targets, [images])
    name = "encoder.layers.encoder_layer_0.self_attention.out_proj.weight"
    torch.testing.assert_close(norms[name], pre.reshape(-1, mha.embed_dim).pow(2).sum(0).sqrt())
