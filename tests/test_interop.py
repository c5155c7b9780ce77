"""Where users already are: torch.nn.utils.prune models convert as they are; converted models
are inference-only and say how to finetune; transformers models round-trip through
save_pretrained / sp.from_pretrained and never reload silently wrong."""

import copy

import pytest
import torch
from torch import nn
from torch.nn.utils import prune as torch_prune

import sparse_prune as sp
from sparse_prune.nn import INFERENCE_ONLY


def _mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(13, 24), nn.GELU(), nn.Linear(24, 7), nn.ReLU(), nn.Linear(7, 5)).eval()


@pytest.mark.parametrize("inplace", [False, True])
@pytest.mark.parametrize("fmt", ["csr", "dense", "bsr", "shrink", None])
def test_torch_pruned_model_converts_without_remove(fmt, inplace):
    model = _mlp()
    torch_prune.l1_unstructured(model[0], "weight", 0.5)
    torch_prune.ln_structured(model[2], "weight", 0.4, n=2, dim=0)
    torch_prune.random_unstructured(model[2], "weight", 0.3)  # a PruningContainer: two masks
    x = torch.randn(3, 13)
    expected = model(x)
    masks = sp.MaskSet.from_model(model)
    assert sorted(masks) == ["0.weight", "2.weight"]
    kw = {} if fmt is None else {"format": fmt}
    if fmt == "bsr":
        kw["block"] = (1, 1)
    with pytest.warns(UserWarning) if fmt is None else _nothing():
        fast = sp.convert(model, masks, inplace=inplace, **kw)
    torch.testing.assert_close(fast(x), expected, rtol=1e-5, atol=1e-6)
    # the converted model holds no torch-prune hooks, masks or *_orig parameters
    assert not any(n.endswith(("_orig", "_mask")) for n, _ in fast.named_parameters())
    assert not any(n.endswith("_mask") for n, _ in fast.named_buffers())
    assert all(not m._forward_pre_hooks for m in fast.modules())
    if not inplace:  # the user's model is still pruned by torch, unchanged
        assert hasattr(model[0], "weight_orig") and hasattr(model[2], "weight_mask")
        torch.testing.assert_close(model(x), expected)
        assert sorted(sp.MaskSet.from_model(model)) == ["0.weight", "2.weight"]


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def test_attach_train_then_convert_is_the_finetuning_path():
    model = _mlp().train()
    masks = sp.prune(model, "l1_unstructured", amount=0.6)
    masks.attach(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x = torch.randn(8, 13)
    for _ in range(2):
        opt.zero_grad()
        model(x).square().mean().backward()
        opt.step()
    model.eval()
    expected = model(x)
    fast = sp.convert(model, sp.MaskSet.from_model(model), format="csr")
    torch.testing.assert_close(fast(x), expected, rtol=1e-5, atol=1e-6)
    for name in masks:  # pruned weights stayed zero through training
        module = fast.get_submodule(name.rpartition(".")[0])
        assert module.weight[~masks[name]].abs().max() == 0


@pytest.mark.parametrize("fmt", ["csr", "2:4", "bsr", "dense"])
@pytest.mark.parametrize("mode", ["train", "eval-input-grad"])
def test_backward_says_inference_only(fmt, mode):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 12), nn.ReLU(), nn.Linear(12, 3))
    method = {"2:4": ("nm", {}), "bsr": ("block", {"amount": 0.5, "block": (4, 4)})}.get(
        fmt, ("l1_unstructured", {"amount": 0.5}))
    masks = sp.prune(model, method[0], **method[1])
    fast = sp.convert(model, masks, format=fmt, **({"block": (4, 4)} if fmt == "bsr" else {}))
    x = torch.randn(5, 16)
    if mode == "train":
        fast.train()
    else:
        fast.eval()
        x.requires_grad_(True)
    out = fast(x)
    with torch.no_grad():  # the values are those of the untracked call
        torch.testing.assert_close(out, fast(x))
    with pytest.raises(RuntimeError, match="inference-only") as info:
        out.sum().backward()
    assert str(info.value) == INFERENCE_ONLY
    assert "masks.attach" in INFERENCE_ONLY and "shrink" in INFERENCE_ONLY


def test_inference_calls_do_not_track():
    model = _mlp()
    fast = sp.convert(model, sp.prune(model, "l1_unstructured", amount=0.5), format="csr")
    for p in fast.parameters():
        p.requires_grad_(False)
    x = torch.randn(2, 13)
    assert not fast(x).requires_grad  # eval mode, nothing requires grad: a plain tensor
    with torch.inference_mode():
        assert not fast.train()(x).requires_grad


def test_shrink_cut_layers_train():
    model = _mlp()
    masks = sp.prune(model, "ln_structured", amount=0.5, coupled=True)
    small = sp.convert(model, masks, format="shrink").train()
    assert not any(isinstance(m, sp.SparseLinear) for m in small.modules())
    small(torch.randn(4, 13)).sum().backward()
    assert small[0].weight.grad is not None and small[0].out_features < 24


# ---------------------------------------------------------------------------------------------
# Hugging Face save_pretrained / from_pretrained


HF_RECIPES = {"csr": ("l1_unstructured", {"amount": 0.5}), "2:4": ("nm", {}),
              "shrink": ("ln_structured", {"amount": 0.5, "coupled": True}),
              "bsr": ("block", {"amount": 0.5, "block": (4, 4)})}


@pytest.mark.parametrize("fmt", list(HF_RECIPES))
def test_hf_save_pretrained_round_trip(fmt, hf_vit, images, tmp_path):
    transformers = pytest.importorskip("transformers")
    method, kw = HF_RECIPES[fmt]
    fast = sp.convert(hf_vit, sp.prune(hf_vit, method, **kw), format=fmt,
                      **({"block": (4, 4)} if fmt == "bsr" else {}))
    expected = fast(images).logits
    folder = tmp_path / "hf"
    hf_vit.save_pretrained(folder)  # a dense save first: its weights must not survive
    assert (folder / "model.safetensors").is_file()
    fast.save_pretrained(folder)
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "sparse_prune"]
    with pytest.raises(OSError, match="model.safetensors"):  # transformers refuses, never loads it wrong
        transformers.ViTForImageClassification.from_pretrained(folder)
    back = sp.from_pretrained(folder)
    assert type(back) is type(hf_vit) and not back.training
    torch.testing.assert_close(back(images).logits, expected, rtol=0, atol=0)
    if fmt == "shrink":  # the cut comes from the manifest; config.json stays the dense skeleton
        assert back.vit.layers[0].mlp.fc1.out_features < 64
        assert back.config.intermediate_size == 64
    else:
        assert isinstance(back.vit.layers[0].mlp.fc1, sp.SparseLinear)
    again = tmp_path / "again"
    back.save_pretrained(again)  # the loaded model saves the same way
    torch.testing.assert_close(sp.from_pretrained(again)(images).logits, expected, rtol=0, atol=0)


def test_hf_save_pretrained_follows_copies_and_refuses(hf_vit, images, tmp_path):
    import pickle

    fast = sp.convert(hf_vit, sp.prune(hf_vit, "l1_unstructured", amount=0.5), format="csr")
    for clone in (copy.deepcopy(fast), pickle.loads(pickle.dumps(fast))):
        assert clone.save_pretrained.args[0] is clone  # bound to the copy, not the original
    with pytest.raises(ValueError, match="push_to_hub"):
        fast.save_pretrained(tmp_path / "x", push_to_hub=True)
    with pytest.raises(ValueError, match="state_dict"):
        fast.save_pretrained(tmp_path / "x", state_dict=fast.state_dict())
    hf_vit.save_pretrained(tmp_path / "plain")  # transformers' own folder
    with pytest.raises(ValueError, match="transformers' from_pretrained"):
        sp.from_pretrained(tmp_path / "plain")
    with pytest.raises(FileNotFoundError):
        sp.from_pretrained(tmp_path / "nothing")
    with pytest.raises(TypeError, match="transformers model"):
        sp.save_pretrained(nn.Linear(2, 2), tmp_path / "y")


def test_bert_shrunk_round_trip(tmp_path):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.BertConfig(hidden_size=48, num_hidden_layers=2, num_attention_heads=6, intermediate_size=40,
                                  vocab_size=97, max_position_embeddings=40, num_labels=3)
    bert = transformers.BertForSequenceClassification(cfg).eval()
    ids = torch.randint(0, 97, (2, 9))
    with pytest.warns(UserWarning, match="pooler"):  # the pooler is in no group: the summary says so
        masks = sp.prune(bert, "ln_structured", amount=0.5, coupled=True)
    small = sp.convert(bert, masks, format="shrink")
    small.save_pretrained(tmp_path)
    back = sp.from_pretrained(tmp_path)
    torch.testing.assert_close(back(ids).logits, small(ids).logits, rtol=0, atol=0)
    assert back.bert.encoder.layer[1].attention.self.num_attention_heads == 3
