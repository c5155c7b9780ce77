"""MaskSet: statistics, files, apply/attach/from_model (torch-prune compatible), stacking."""

import copy

import pytest
import torch
from torch import nn
from torch.nn.utils import prune as tp

import sparse_prune as sp


@pytest.fixture
def model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3))


def test_sparsity_and_layer_sparsity(model):
    masks = sp.prune(model, "l1_unstructured", amount=0.4)
    assert masks.layer_sparsity() == {"0.weight": 12 / 30, "2.weight": 6 / 15}
    assert masks.sparsity() == pytest.approx(18 / 45)
    assert sp.MaskSet().sparsity() == 0.0
    text = masks.summary()
    assert "0.weight" in text and "total" in text and "0.4000" in text


def test_save_load_round_trip(model, tmp_path):
    masks = sp.prune(model, "ln_structured", amount=0.4, n=1, dim=1)
    path = tmp_path / "m.safetensors"
    masks.save(path)
    back = sp.MaskSet.load(path)
    assert list(back) == list(masks)
    assert all(torch.equal(back[k], masks[k]) for k in masks)
    assert back.info["method"] == "ln_structured" and back.info["n"] == 1.0


def test_load_rejects_non_bool(tmp_path):
    from safetensors.torch import save_file

    save_file({"w": torch.ones(2)}, str(tmp_path / "bad.safetensors"))
    with pytest.raises(ValueError, match="torch.bool"):
        sp.MaskSet.load(tmp_path / "bad.safetensors")


def test_construct_rejects_non_bool():
    with pytest.raises(TypeError, match="torch.bool"):
        sp.MaskSet({"w": torch.ones(2)})


def test_apply_zeroes_in_place(model):
    masks = sp.prune(model, "l1_unstructured", amount=0.5)
    out = masks.apply(model)
    assert out is model
    for name, mask in masks.items():
        w = model.get_parameter(name)
        assert (w[~mask] == 0).all() and (w[mask] != 0).all()


def test_apply_wrong_shape_modifies_nothing(model):
    before = copy.deepcopy(model.state_dict())
    good = sp.prune(model, "l1_unstructured", amount=0.5)
    bad = sp.MaskSet({**good, "2.weight": torch.ones(3, 4, dtype=torch.bool)})
    with pytest.raises(ValueError, match="shape"):
        bad.apply(model)
    with pytest.raises(ValueError, match="shape"):
        bad.attach(model)
    with pytest.raises(ValueError, match="names no parameter"):
        sp.MaskSet({"nope.weight": torch.ones(1, dtype=torch.bool)}).apply(model)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert not hasattr(model[0], "weight_orig")


def test_attach_is_torch_prune_compatible(model):
    masks = sp.prune(model, "l1_unstructured", amount=0.5)
    x = torch.randn(4, 6)
    expected = copy.deepcopy(model)
    masks.apply(expected)
    masks.attach(model)
    assert hasattr(model[0], "weight_orig") and hasattr(model[0], "weight_mask")
    torch.testing.assert_close(model(x), expected(x), rtol=0, atol=0)
    back = sp.MaskSet.from_model(model)
    assert all(torch.equal(back[k], masks[k]) for k in masks)
    for m in (model[0], model[2]):
        tp.remove(m, "weight")
    torch.testing.assert_close(model(x), expected(x), rtol=0, atol=0)
    assert len(sp.MaskSet.from_model(model)) == 0


def test_from_model_reads_torch_masks(model):
    tp.random_unstructured(model[0], "weight", amount=0.3)
    tp.ln_structured(model[2], "weight", amount=0.4, n=2, dim=0)
    masks = sp.MaskSet.from_model(model)
    assert set(masks) == {"0.weight", "2.weight"}
    assert torch.equal(masks["2.weight"], model[2].weight_mask.bool())


def test_and_stacks_rounds(model):
    first = sp.prune(model, "l1_unstructured", amount=0.3)
    first.apply(model)
    second = sp.prune(model, "random_unstructured", amount=0.3, seed=1)
    both = first & second
    for k in first:
        assert torch.equal(both[k], first[k] & second[k])
        assert not both[k][~first[k]].any()  # old zeros stay zero
    other = sp.MaskSet({"0.weight": torch.ones(2, 2, dtype=torch.bool)})
    with pytest.raises(ValueError, match="differ"):
        first & other
    extra = sp.MaskSet({"x.weight": torch.ones(2, dtype=torch.bool)})
    assert set(first & extra) == {"0.weight", "2.weight", "x.weight"}
