"""Dependency-aware shrink: neurons and heads removed physically, the function unchanged."""

import copy
import warnings

import pytest
import torch
from torch import nn

import sparse_prune as sp
from sparse_prune.shrink import HeadPrunedAttention


def _logits(out):
    return out.logits if hasattr(out, "logits") else out


def _count(model):
    return sum(t.numel() for t in (*model.parameters(), *model.buffers()))


@pytest.mark.parametrize("fixture", ["hf_vit", "timm_vit", "tv_vit"])
@pytest.mark.parametrize("amount", [0.25, 0.5, 0.75])
def test_coupled_shrink_removes_units_and_keeps_logits(fixture, amount, request, images):
    model = request.getfixturevalue(fixture)
    masks = sp.prune(model, "ln_structured", amount=amount, coupled=True, exclude=[r"classifier|head"])
    expected = _logits(masks.apply(copy.deepcopy(model))(images))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        small = sp.convert(model, masks, format="shrink")
    torch.testing.assert_close(_logits(small(images)), expected, rtol=1e-5, atol=1e-5)
    assert _count(small) < _count(model)
    # no gather/scatter left: every cut layer is a plain, smaller Linear
    assert not any(isinstance(m, sp.SparseLinear) for m in small.modules())
    groups = {g.name: g.units for g in sp.find_groups(small)}
    before = {g.name: g.units for g in sp.find_groups(model)}
    assert all(groups[name] < units for name, units in before.items())
    rows = [r for r in sp.report(small) if r["format"] == "shrink (cut)"]
    assert rows and all(r["bytes"] < r["dense_bytes"] for r in rows)


def test_head_counts_follow(hf_vit, timm_vit, tv_vit):
    for model in (hf_vit, timm_vit, tv_vit):
        masks = sp.prune(model, "ln_structured", amount=0.5, coupled=True)
        small = sp.convert(model, masks, format="shrink")
        for g in sp.find_groups(small):
            if g.kind == "heads":
                attn = small.get_submodule(g.name)
                heads = getattr(attn, "num_attention_heads", getattr(attn, "num_heads", None))
                assert heads == g.units == 2
                if hasattr(attn, "attn_dim"):
                    assert attn.attn_dim == 2 * attn.head_dim
        if model is tv_vit:
            assert sum(isinstance(m, HeadPrunedAttention) for m in small.modules()) == 2


@pytest.mark.parametrize("round_to", [1, 8, 16])
def test_round_to_pads_mlp_width(hf_vit, images, round_to):
    masks = sp.prune(hf_vit, "ln_structured", amount=0.3, coupled=True, exclude=[r"attention|classifier"])
    expected = _logits(masks.apply(copy.deepcopy(hf_vit))(images))
    small = sp.convert(hf_vit, masks, format="shrink", round_to=round_to)
    fc1 = small.vit.layers[0].mlp.fc1
    assert fc1.out_features % round_to == 0 and fc1.out_features < 64
    torch.testing.assert_close(_logits(small(images)), expected, rtol=1e-5, atol=1e-5)


def test_uncoupled_dim0_mask_uses_generic_path(hf_vit, images):
    # fc1 rows pruned but fc2 columns kept: the neurons still feed fc2 (GELU(bias)), so the
    # MLP cannot be cut; fc1 goes through gather/scatter instead.
    masks = sp.prune(hf_vit, "ln_structured", amount=0.5, dim=0, exclude=[r"attention|classifier|fc2"])
    expected = _logits(masks.apply(copy.deepcopy(hf_vit))(images))
    small = sp.convert(hf_vit, masks, format="shrink")
    assert isinstance(small.vit.layers[0].mlp.fc1, sp.SparseLinear)
    assert small.vit.layers[0].mlp.fc2.in_features == 64
    torch.testing.assert_close(_logits(small(images)), expected, rtol=1e-5, atol=1e-5)


def test_coupled_false_keeps_shapes(hf_vit, images):
    masks = sp.prune(hf_vit, "ln_structured", amount=0.5, coupled=True)
    expected = _logits(masks.apply(copy.deepcopy(hf_vit))(images))
    small = sp.convert(hf_vit, masks, format="shrink", coupled=False)
    assert sum(isinstance(m, sp.SparseLinear) for m in small.modules()) == len(masks)
    torch.testing.assert_close(_logits(small(images)), expected, rtol=1e-5, atol=1e-5)


def test_all_heads_pruned_keeps_one(hf_vit, images):
    masks = dict(sp.prune(hf_vit, "ln_structured", amount=0.0, coupled=True))
    name = "vit.layers.0.attention.o_proj.weight"
    masks[name] = torch.zeros_like(masks[name])
    masks = sp.MaskSet(masks)
    expected = _logits(masks.apply(copy.deepcopy(hf_vit))(images))
    small = sp.convert(hf_vit, masks, format="shrink")
    assert small.vit.layers[0].attention.num_attention_heads == 1
    torch.testing.assert_close(_logits(small(images)), expected, rtol=1e-5, atol=1e-5)


def test_timm_scale_norm_blocks_cut_with_warning(images):
    import timm

    torch.manual_seed(0)
    model = timm.models.vision_transformer.VisionTransformer(
        img_size=32, patch_size=8, embed_dim=32, depth=1, num_heads=4, mlp_ratio=2.0, num_classes=10,
        scale_attn_norm=True, scale_mlp_norm=True).eval()
    masks = sp.prune(model, "ln_structured", amount=0.5, coupled=True)
    expected = masks.apply(copy.deepcopy(model))(images)
    with pytest.warns(UserWarning, match="scale_norm"):
        small = sp.convert(model, masks, format="shrink")
    assert small.blocks[0].attn.num_heads == 4
    torch.testing.assert_close(small(images), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("need_weights", [True, False])
@pytest.mark.parametrize("masks", ["none", "attn", "padding"])
def test_head_pruned_attention_matches_mha(batch_first, need_weights, masks):
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(24, 3, batch_first=batch_first).eval()
    ours = HeadPrunedAttention.from_mha(mha, 3)
    ours.load_state_dict(mha.state_dict())
    x = torch.randn(2, 5, 24) if batch_first else torch.randn(5, 2, 24)
    kw = {}
    if masks == "attn":
        kw["attn_mask"] = torch.rand(5, 5) > 0.7
        kw["attn_mask"].fill_diagonal_(False)
    elif masks == "padding":
        kw["key_padding_mask"] = torch.tensor([[False] * 4 + [True], [False] * 5])
    out, w = ours(x, x, x, need_weights=need_weights, **kw)
    ref, ref_w = mha(x, x, x, need_weights=need_weights, **kw)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    if need_weights:
        torch.testing.assert_close(w, ref_w, rtol=1e-5, atol=1e-5)
    else:
        assert w is None


@pytest.mark.parametrize("fmt,method,kw", [("csr", "l1_unstructured", {"amount": 0.9}), ("2:4", "nm", {}),
                                           ("bsr", "l1_unstructured", {"amount": 0.7, "block": (16, 16)})])
def test_torchvision_out_proj_is_converted(tv_vit, images, fmt, method, kw):
    fkw = {k: v for k, v in kw.items() if k == "block"}
    masks = sp.prune(tv_vit, method, **{k: v for k, v in kw.items() if k != "block"})
    expected = masks.apply(copy.deepcopy(tv_vit))(images)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fast = sp.convert(tv_vit, masks, format=fmt, **fkw)
    attn = fast.encoder.layers[0].self_attention
    assert isinstance(attn, HeadPrunedAttention) and attn.num_heads == 4
    assert isinstance(attn.out_proj, sp.SparseLinear)
    torch.testing.assert_close(fast(images), expected, rtol=1e-5, atol=1e-5)
