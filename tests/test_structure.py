"""ViT dependency groups and coupled structured pruning for transformers, timm, torchvision."""

import pytest
import torch

import sparse_prune as sp

MODELS = ["hf_vit", "timm_vit", "tv_vit"]


@pytest.mark.parametrize("fixture", MODELS)
def test_groups_found(fixture, request):
    model = request.getfixturevalue(fixture)
    groups = sp.find_groups(model)
    kinds = [g.kind for g in groups]
    assert kinds.count("heads") == 2 and kinds.count("mlp") == 2
    params = dict(model.named_parameters())
    for g in groups:
        assert g.units == (4 if g.kind == "heads" else 64)
        for m in g.members:
            assert m.param in params
            assert params[m.param].shape[m.dim] >= m.offset + g.units * m.width


@pytest.mark.parametrize("fixture", MODELS)
@pytest.mark.parametrize("method", ["ln_structured", "random_structured"])
@pytest.mark.parametrize("scope", ["local", "global"])
def test_coupled_units_are_consistent(fixture, method, scope, request):
    model = request.getfixturevalue(fixture)
    masks = sp.prune(model, method, amount=0.5, scope=scope, coupled=True, exclude=("classifier", "head", "heads"))
    for g in sp.find_groups(model):
        dead_per_member = []
        for m in g.members:
            mask = masks[m.param].narrow(m.dim, m.offset, g.units * m.width)
            per_unit = mask.movedim(m.dim, 0).reshape(g.units, -1)
            assert (per_unit.all(1) | ~per_unit.any(1)).all(), "units must be whole"
            dead_per_member.append(~per_unit.any(1))
        assert all(torch.equal(d, dead_per_member[0]) for d in dead_per_member)
        if scope == "local":
            assert int(dead_per_member[0].sum()) == round(0.5 * g.units)


def _bias_of(model, weight_name):
    params = dict(model.named_parameters())
    return params.get(weight_name[: -len("weight")] + "bias") if weight_name.endswith("weight") else \
        params.get(weight_name.replace("weight", "bias"))


@pytest.mark.parametrize("fixture", MODELS)
def test_pruned_units_do_not_reach_the_output(fixture, request, images):
    """Coupled masks make pruned units dead: perturbing their biases changes nothing."""
    model = request.getfixturevalue(fixture)
    masks = sp.prune(model, "ln_structured", amount=0.5, coupled=True, exclude=("classifier", "head"))
    masks.apply(model)
    with torch.no_grad():
        ref = model(images)
        ref = ref.logits if hasattr(ref, "logits") else ref
        for g in sp.find_groups(model):
            for m in g.members:
                if m.dim != 0:
                    continue
                bias = _bias_of(model, m.param)
                if bias is None:
                    continue
                dead = ~masks[m.param].narrow(0, m.offset, g.units * m.width).any(1)
                bias.narrow(0, m.offset, g.units * m.width)[dead] += 5.0
        out = model(images)
        out = out.logits if hasattr(out, "logits") else out
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def test_coupled_exclude_skips_group(hf_vit):
    masks = sp.prune(hf_vit, "ln_structured", amount=0.5, coupled=True, exclude=(r"layers\.0\.mlp\.fc2",))
    assert not any("layers.0.mlp.fc2" in k for k in masks)
    # fc1 of the skipped group is pruned on its own (dim 0) like any other ungrouped Linear
    assert masks.layer_sparsity()["vit.layers.0.mlp.fc1.weight"] == 0.5


# nm, wanda and sparsegpt compare weights within a row or block: local only (global is an error)
METHOD_SCOPES = [(m, s) for m in sp.METHODS for s in ("local", "global")
                 if not (m in ("nm", "wanda", "sparsegpt") and s == "global")]


@pytest.mark.parametrize("fixture", MODELS)
@pytest.mark.parametrize("method, scope", METHOD_SCOPES)
def test_every_method_and_scope(fixture, method, scope, request, images):
    model = request.getfixturevalue(fixture)
    kw = {"scope": scope}
    if method in ("wanda", "sparsegpt"):
        kw["calibration"] = [images]
    if method != "nm":
        kw["amount"] = 0.5
    if method == "block":  # the default 32x32 is a whole layer of these 32-wide ViTs
        kw["block"] = (4, 4)
    masks = sp.prune(model, method, **kw)
    # Linear weights: HF q,k,v,o,fc1,fc2; timm qkv,proj,fc1,fc2; torchvision out_proj + MLP
    # (its packed in_proj is no Linear: info says so); and the classifier, which structured
    # methods leave out by default
    structured = method in ("ln_structured", "random_structured")
    assert len(masks) == {"hf_vit": 13, "timm_vit": 9, "tv_vit": 7}[fixture] - structured
    assert len(masks.info.get("not_pruned", ())) == (2 if fixture == "tv_vit" else 0)
    assert (masks.info.get("classifier_excluded") is not None) == structured
    if method in ("ln_structured", "random_structured") and scope == "global":
        # the amount counts units (rows) across layers of different widths, not weights
        assert 0.3 < masks.sparsity() < 0.7
    else:
        assert masks.sparsity() == pytest.approx(0.5, abs=0.02)
