"""coupled=True says what it coupled and what it left; shrink never builds a broken model
(Swin, BERT, plain MLPs, attention it does not know); the defaults that protect (classifier,
fingerprint)."""

import copy
import warnings

import pytest
import torch
from torch import nn

import sparse_prune as sp
from sparse_prune.structure import scan


def _out(o):
    return o.logits if hasattr(o, "logits") else o


def _timm_swin():
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    return timm.create_model("swin_tiny_patch4_window7_224", pretrained=False, img_size=56, window_size=7,
                             depths=(2, 2), embed_dim=32, num_heads=(2, 4), num_classes=5).eval()


def _tv_swin():
    pytest.importorskip("torchvision")
    from torchvision.models.swin_transformer import SwinTransformer

    torch.manual_seed(0)
    return SwinTransformer(patch_size=[4, 4], embed_dim=32, depths=[2, 2], num_heads=[2, 4], window_size=[7, 7],
                           num_classes=5).eval()


def _bert():
    pytest.importorskip("transformers")
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    cfg = BertConfig(hidden_size=48, num_hidden_layers=2, num_attention_heads=6, intermediate_size=40,
                     vocab_size=97, max_position_embeddings=40, num_labels=3)
    return BertForSequenceClassification(cfg).eval()


def _deit():
    pytest.importorskip("transformers")
    from transformers import DeiTConfig, DeiTForImageClassification

    torch.manual_seed(0)
    return DeiTForImageClassification(DeiTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                                 intermediate_size=64, image_size=56, patch_size=8,
                                                 num_labels=5)).eval()


def _roberta():
    pytest.importorskip("transformers")
    from transformers import RobertaConfig, RobertaForSequenceClassification

    torch.manual_seed(0)
    cfg = RobertaConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=40,
                        vocab_size=97, max_position_embeddings=40, num_labels=3)
    return RobertaForSequenceClassification(cfg).eval()


def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(11, 30), nn.GELU(), nn.Dropout(0.1), nn.Linear(30, 17), nn.ReLU(),
                         nn.Linear(17, 5)).eval()


IMAGES = torch.randn(2, 3, 56, 56, generator=torch.Generator().manual_seed(1))
TOKENS = torch.randint(0, 97, (2, 13), generator=torch.Generator().manual_seed(1))
MLP_IN = torch.randn(4, 11, generator=torch.Generator().manual_seed(1))
# model, its input, groups expected (mlp, heads), attention modules left whole
CASES = {
    "timm_swin": (_timm_swin, IMAGES, (4, 4), 0),
    "tv_swin": (_tv_swin, IMAGES, (4, 0), 4),  # ShiftedWindowAttention: head_dim = C // heads, not cut
    "bert": (_bert, TOKENS, (2, 2), 0),
    "deit": (_deit, IMAGES, (2, 2), 0),
    "roberta": (_roberta, TOKENS.clamp(3, 96), (2, 2), 0),  # ids above the padding id
    "mlp": (_mlp, MLP_IN, (2, 0), 0),
}


@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("amount", [0.3, 0.5])
def test_coupled_shrink_keeps_the_function(name, amount):
    build, x, (mlps, heads), left = CASES[name]
    model = build()
    groups, unknown = scan(model)
    assert (sum(g.kind == "mlp" for g in groups), sum(g.kind == "heads" for g in groups)) == (mlps, heads)
    assert len(unknown) == left
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        masks = sp.prune(model, "ln_structured", amount=amount, coupled=True)
    summary = masks.info["coupled_summary"]
    assert summary.startswith(f"coupled: {mlps} MLP group(s), {heads} attention-head group(s)")
    if left:
        assert "heads left whole" in summary and any(summary == str(w.message) for w in seen)
    expected = _out(masks.apply(copy.deepcopy(model))(x))
    small = sp.convert(model, masks, format="shrink")
    torch.testing.assert_close(_out(small(x)), expected, rtol=1e-5, atol=1e-5)
    after = {g.name: g.units for g in sp.find_groups(small)}
    for g in groups:  # every recognised group lost units, and says so in its head count
        assert after[g.name] < g.units, g.name
    assert sum(p.numel() for p in small.parameters()) < sum(p.numel() for p in model.parameters())


def test_swin_relative_position_table_follows_heads():
    model = _timm_swin()
    masks = sp.prune(model, "ln_structured", amount=0.5, coupled=True)
    small = sp.convert(model, masks, format="shrink")
    attn = small.layers[1].blocks[0].attn
    assert attn.num_heads == 2 and attn.relative_position_bias_table.shape[1] == 2
    assert not any(".relative_position_bias_table" in n for n in masks)  # cut, never masked


def test_bert_heads_and_config_free_shrink():
    model = _bert()
    masks = sp.prune(model, "ln_structured", amount=0.5, coupled=True)
    small = sp.convert(model, masks, format="shrink")
    inner = small.bert.encoder.layer[0].attention.self
    assert inner.num_attention_heads == 3 and inner.all_head_size == 24 and inner.query.out_features == 24
    assert small.bert.encoder.layer[0].attention.output.dense.in_features == 24


class _Gated(nn.Module):
    """fc1/fc2 names, but not an MLP a unit can be cut from: fc1's output is also summed."""

    def __init__(self):
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 8)

    def forward(self, x):
        h = self.fc1(x)
        return self.fc2(self.act(h)) + h.sum(-1, keepdim=True)


class _OddAttention(nn.Module):
    """qkv/proj/num_heads like timm's Attention, another forward (head_dim from C)."""

    def __init__(self, dim=16, heads=4):
        super().__init__()
        self.num_heads, self.qkv, self.proj = heads, nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)

    def forward(self, x):
        b, n, c = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.num_heads, c // self.num_heads).permute(2, 0, 3, 1, 4)
        return self.proj(nn.functional.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, c))


class _ResidualSequential(nn.Sequential):
    """A Sequential whose forward is not the chain."""

    def forward(self, x):
        h = self[0](x)
        return self[2](self[1](h)) + h[..., :6]


@pytest.mark.parametrize("module, x", [(_Gated(), torch.randn(3, 8)), (_OddAttention(), torch.randn(2, 5, 16)),
                                       (_ResidualSequential(nn.Linear(6, 10), nn.ReLU(), nn.Linear(10, 6)),
                                        torch.randn(3, 6))])
def test_unknown_modules_are_never_cut(module, x):
    model = nn.Sequential(module, nn.Linear(x.shape[-1], 3)).eval()
    groups, left = scan(model)
    assert groups == []
    assert left == (["0 (_OddAttention)"] if isinstance(module, _OddAttention) else [])
    with pytest.warns(UserWarning, match="pruned on their own"):
        masks = sp.prune(model, "ln_structured", amount=0.5, coupled=True)
    expected = masks.apply(copy.deepcopy(model))(x)
    small = sp.convert(model, masks, format="shrink")  # generic gather/scatter: the same function
    torch.testing.assert_close(small(x), expected, rtol=1e-5, atol=1e-6)


def test_torchvision_packed_projection_is_reported(tv_vit):
    with pytest.warns(UserWarning, match="packed q/k/v"):
        masks = sp.prune(tv_vit, "l1_unstructured", amount=0.5)
    assert masks.info["not_pruned"] == [f"encoder.layers.encoder_layer_{i}.self_attention.in_proj_weight"
                                        for i in range(2)]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # coupled: the heads group holds in_proj
        masks = sp.prune(tv_vit, "ln_structured", amount=0.5, coupled=True)
    assert "not_pruned" not in masks.info


# ---------------------------------------------------------------------------------------------
# Defaults that protect


@pytest.mark.parametrize("fixture, head", [("hf_vit", "classifier.weight"), ("timm_vit", "head.weight"),
                                           ("tv_vit", "heads.head.weight")])
@pytest.mark.parametrize("method", ["ln_structured", "random_structured"])
def test_structured_leaves_the_classifier(fixture, head, method, request):
    model = request.getfixturevalue(fixture)
    masks = sp.prune(model, method, amount=0.5)
    assert head not in masks and masks.info["classifier_excluded"] == head
    opted = sp.prune(model, method, amount=0.5, include_classifier=True)
    assert head in opted and opted.info["classifier_excluded"] is None
    assert head in sp.prune(model, "l1_unstructured", amount=0.5)  # per-weight methods prune it
    with pytest.raises(ValueError, match="include_classifier"):
        sp.prune(model, "l1_unstructured", amount=0.5, include_classifier=True)
    with pytest.raises(TypeError, match="include_classifier"):
        sp.prune(model, method, amount=0.5, include_classifier="yes")


def test_lone_linear_is_not_a_classifier():
    masks = sp.prune(nn.Linear(6, 4), "ln_structured", amount=0.5)
    assert list(masks) == ["weight"]
    assert list(sp.prune(nn.Sequential(nn.Linear(6, 4)), "ln_structured", amount=0.5)) == ["0.weight"]
    # a conv net's only Linear is its head (ConvNeXt's head.fc): left out, and said so
    convnet = nn.Sequential(nn.Conv2d(3, 8, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4))
    masks = sp.prune(convnet, "ln_structured", amount=0.5, include=(nn.Linear, nn.Conv2d))
    assert list(masks) == ["0.weight"] and masks.info["classifier_excluded"] == "3.weight"


def test_fingerprint_refuses_another_model(tmp_path):
    def vit(depth):
        from transformers import ViTConfig, ViTForImageClassification

        torch.manual_seed(0)
        return ViTForImageClassification(ViTConfig(hidden_size=32, num_hidden_layers=depth, num_attention_heads=4,
                                                   intermediate_size=64, image_size=32, patch_size=8,
                                                   num_labels=10)).eval()

    small, big = vit(2), vit(3)
    masks = sp.prune(small, "l1_unstructured", amount=0.5)
    assert masks.info["fingerprint"] == sp.masks.fingerprint(copy.deepcopy(small).double())
    masks.validate(small)  # the model they came from
    for run in (masks.apply, masks.attach, lambda m: sp.convert(m, masks, format="csr")):
        with pytest.raises(ValueError, match="computed on another model"):
            run(copy.deepcopy(big))
    masks.save(tmp_path / "m.safetensors")  # kept in the file
    with pytest.raises(ValueError, match="another model"):
        sp.MaskSet.load(tmp_path / "m.safetensors").apply(copy.deepcopy(big))
    old = sp.MaskSet(dict(masks.items()), {"method": "l1_unstructured"})  # a file from before: no check
    old.save(tmp_path / "old.safetensors")
    sp.MaskSet.load(tmp_path / "old.safetensors").apply(copy.deepcopy(big))
    del masks.info["fingerprint"]  # the way out, named in the error
    masks.apply(copy.deepcopy(big))
    # stacking rounds on one model keeps it; from_model records it (attached names without _orig)
    stacked = sp.prune(small, "l1_unstructured", amount=0.3) & sp.prune(small, "nm")
    assert stacked.info["fingerprint"] == sp.masks.fingerprint(small)
    attached = sp.prune(small, "l1_unstructured", amount=0.3).attach(copy.deepcopy(small))
    assert sp.MaskSet.from_model(attached).info["fingerprint"] == sp.masks.fingerprint(small)


@pytest.mark.parametrize("name", list(CASES))
def test_shrunk_models_save_and_load(name, tmp_path):
    build, x, _, _ = CASES[name]
    model = build()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        masks = sp.prune(model, "ln_structured", amount=0.5, coupled=True)
    small = sp.convert(model, masks, format="shrink")
    sp.save(small, tmp_path)
    back = sp.load(build(), tmp_path)  # a fresh dense skeleton: groups (and Swin's table) cut again
    torch.testing.assert_close(_out(back(x)), _out(small(x)), rtol=0, atol=0)


class _OwnMlp(nn.Module):
    """A user's MLP: not a library class, but fc1 -> act -> dropout -> fc2, which torch.fx sees."""

    def __init__(self, act):
        super().__init__()
        self.fc1, self.act, self.drop, self.fc2 = nn.Linear(9, 21), act, nn.Dropout(0.0), nn.Linear(21, 9)

    def forward(self, x):
        return self.fc2(self.drop(self.act(self.fc1(x))))


class _FunctionalMlp(_OwnMlp):
    def forward(self, x):
        return self.fc2(torch.nn.functional.gelu(self.fc1(x)).relu())


class _ScaledMlp(_OwnMlp):
    def forward(self, x):
        h = self.fc1(x)
        return self.fc2(h * h.mean(-1, keepdim=True))  # mixes units: not element-wise


class _BranchyMlp(_OwnMlp):
    def forward(self, x):
        if x.sum() > 0:  # data-dependent: untraceable
            return self.fc2(self.act(self.fc1(x)))
        return x


@pytest.mark.parametrize("cls, grouped", [(_OwnMlp, True), (_FunctionalMlp, True), (_ScaledMlp, False),
                                          (_BranchyMlp, False)])
def test_user_mlps_are_grouped_only_when_traced_elementwise(cls, grouped):
    torch.manual_seed(0)
    model = nn.Sequential(cls(nn.SiLU()), nn.Linear(9, 4)).eval()
    groups, _ = scan(model)
    assert [(g.kind, g.name) for g in groups] == ([("mlp", "0")] if grouped else [])
    x = torch.randn(3, 9)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        masks = sp.prune(model, "ln_structured", amount=0.5, coupled=True)
    expected = masks.apply(copy.deepcopy(model))(x)
    small = sp.convert(model, masks, format="shrink")
    torch.testing.assert_close(small(x), expected, rtol=1e-5, atol=1e-6)
    assert (small[0].fc1.out_features < 21) == grouped

