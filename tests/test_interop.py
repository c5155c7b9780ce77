"""Where users already are: torch.nn.utils.prune models convert as they are; converted models
are inference-only and say how to finetune."""


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
