"""SparseGPT: against a slow reference written from the paper, reconstruction error, the
sequential model driver, reconstructed weights in MaskSet/convert, and its errors."""

import contextlib
import copy

import pytest
import torch
from torch import nn

import sparse_prune as sp
from sparse_prune import sparsegpt as sg
from sparse_prune.pruning import collect_targets


def _reference(weight, x, amount=None, pattern=None, blocksize=128, percdamp=0.01):
    """The paper, column by column, in fp64, with ``inv(H[j:, j:])`` recomputed for every column.

    For column j (remaining columns F = j..K-1): saliency w² / [H_F⁻¹]₀₀; a pruned weight's error
    goes to the remaining columns as δ = -(w - q) / [H_F⁻¹]₀₀ · [H_F⁻¹]₀,:. Masks: exact counts
    per column block (unstructured, cumulative rounding) or the M - N smallest of every M (N:M).
    Dead inputs are decoupled from the others and score 0.
    """
    W = weight.double().clone()
    rows, cols = W.shape
    H = 2 * x.double().T @ x.double() / x.shape[0]
    dead = H.diagonal() == 0
    mean = H.diagonal()[~dead].mean()
    H[dead, :] = 0
    H[:, dead] = 0
    H[dead, dead] = mean
    H += percdamp * mean * torch.eye(cols, dtype=H.dtype)
    denom = torch.stack([torch.linalg.inv(H[j:, j:])[0, 0] for j in range(cols)])
    live = (~dead).double()
    pruned = torch.zeros(rows, cols, dtype=torch.bool)
    total = round(amount * rows * cols) if amount is not None else 0
    for b0 in range(0, cols, blocksize):
        b1 = min(b0 + blocksize, cols)
        if amount is not None:
            k = int(total * b1 / cols + 0.5) - int(total * b0 / cols + 0.5)
            score = (W[:, b0:b1] ** 2 / denom[b0:b1] * live[b0:b1]).reshape(-1)
            block = torch.zeros(rows * (b1 - b0), dtype=torch.bool)
            block[score.argsort(stable=True)[:k]] = True
            pruned[:, b0:b1] = block.view(rows, b1 - b0)
        for j in range(b0, b1):
            if pattern is not None and (j - b0) % pattern[1] == 0:
                n, m = pattern
                score = W[:, j:j + m] ** 2 / denom[j:j + m] * live[j:j + m]
                pruned[:, j:j + m].scatter_(1, score.argsort(dim=1, stable=True)[:, :m - n], True)
            Hinv = torch.linalg.inv(H[j:, j:])
            q = W[:, j].masked_fill(pruned[:, j], 0)
            W[:, j:] -= ((W[:, j] - q) / Hinv[0, 0])[:, None] * Hinv[0][None, :]
            W[:, j] = q
    return ~pruned, W


def _data(rows=12, cols=40, tokens=300, seed=0, dead=()):
    """A weight and inputs with correlated, unevenly scaled features (and optional dead ones)."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(cols, cols, generator=g) / cols**0.5 + torch.eye(cols)
    scale = torch.logspace(-1, 1, cols)[torch.randperm(cols, generator=g)]
    x = (torch.randn(tokens, cols, generator=g) @ mix) * scale
    x[:, list(dead)] = 0
    return torch.randn(rows, cols, generator=g), x


@pytest.mark.parametrize("kw", [
    {"amount": 0.5, "blocksize": 16}, {"amount": 0.3, "blocksize": 128}, {"amount": 0.77, "blocksize": 7},
    {"pattern": (2, 4), "blocksize": 16}, {"pattern": (1, 4), "blocksize": 8}, {"pattern": (3, 8), "blocksize": 16},
])
@pytest.mark.parametrize("dead", [(), (0, 5, 17)])
def test_prune_layer_matches_paper_reference(kw, dead):
    weight, x = _data(dead=dead)
    hessian = 2 * x.T @ x / x.shape[0]
    keep, new = sg.prune_layer(weight, hessian, **kw)
    ref_keep, ref_new = _reference(weight, x, **kw)
    assert torch.equal(keep, ref_keep)
    torch.testing.assert_close(new.double(), ref_new, rtol=1e-4, atol=1e-4)
    assert (new[~keep] == 0).all()
    if "amount" in kw:
        assert int((~keep).sum()) == round(kw["amount"] * weight.numel())
    else:
        n, m = kw["pattern"]
        assert (keep.view(weight.shape[0], -1, m).sum(-1) == n).all()
    if dead:  # dead inputs are pruned first; a kept one keeps its value
        assert not keep[:, list(dead)].any() or torch.equal(new[:, list(dead)][keep[:, list(dead)]],
                                                           weight[:, list(dead)][keep[:, list(dead)]])


def test_dead_inputs_kept_keep_their_values():
    weight, x = _data(dead=range(0, 40, 2))  # half the inputs dead, prune only a quarter
    keep, new = sg.prune_layer(weight, 2 * x.T @ x, amount=0.25, blocksize=16)
    dead = torch.arange(0, 40, 2)
    assert keep[:, dead].float().mean() < 0.55  # dead ones went first ...
    assert keep[:, 1::2].all()  # ... so no live weight was pruned
    torch.testing.assert_close(new[:, dead][keep[:, dead]], weight[:, dead][keep[:, dead]])


@pytest.mark.parametrize("how, margin", [({"amount": 0.5}, 0.95), ({"pattern": "2:4"}, 0.7), ({"amount": 0.7}, 0.95)])
def test_reconstruction_error_below_magnitude_and_wanda(how, margin):
    """‖WX − ŴX‖ on features driven by 24 shared factors, scaled over two decades."""
    g = torch.Generator().manual_seed(0)
    rows, cols, tokens = 32, 64, 512
    z = torch.randn(tokens, 24, generator=g)
    x = z @ torch.randn(24, cols, generator=g) + 0.3 * torch.randn(tokens, cols, generator=g)
    x = x * torch.logspace(-1, 1, cols)[torch.randperm(cols, generator=g)]
    weight = torch.randn(rows, cols, generator=g)
    layer = nn.Linear(cols, rows, bias=False)
    with torch.no_grad():
        layer.weight.copy_(weight)
    batches = list(x.split(128))
    ref = x @ weight.T

    def err(w):
        return float((x @ w.T - ref).norm() / ref.norm())

    ours = sp.prune(layer, "sparsegpt", calibration=batches, **how)
    wanda = sp.prune(layer, "wanda", calibration=batches, **how)
    magnitude = sp.prune(layer, "nm", **how) if "pattern" in how else sp.prune(layer, "l1_unstructured", **how)
    assert ours.sparsity() == magnitude.sparsity() == pytest.approx(wanda.sparsity(), abs=0.005)
    e_sgpt = err(ours.weights["weight"])
    e_wanda, e_mag = err(weight * wanda["weight"]), err(weight * magnitude["weight"])
    # seen: 0.042 / 0.048 / 0.27 (50%), 0.083 / 0.139 / 0.34 (2:4), 0.125 / 0.134 / 0.45 (70%)
    assert e_sgpt < margin * e_wanda and e_sgpt < 0.5 * e_mag, (e_sgpt, e_wanda, e_mag)
    # the reconstruction is what wins: SparseGPT's mask without its update is no better than Wanda's
    assert err(weight * ours["weight"]) > e_sgpt * 1.2


# ---------------------------------------------------------------------------------------
# The model driver


def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 24), nn.GELU(), nn.Linear(24, 8)).eval()


def test_layers_are_calibrated_sequentially():
    """Layer 2 is pruned on the outputs of the pruned and reconstructed layer 1."""
    model = _mlp()
    batches = [torch.randn(10, 16, generator=torch.Generator().manual_seed(i)) for i in range(3)]
    masks = sp.prune(model, "sparsegpt", amount=0.5, calibration=batches, blocksize=8)
    x = torch.cat(batches)
    keep0, w0 = sg.prune_layer(model[0].weight, 2 * x.T @ x, amount=0.5, blocksize=8)
    h = nn.functional.gelu(x @ w0.T + model[0].bias)
    keep2, w2 = sg.prune_layer(model[2].weight, 2 * h.T @ h, amount=0.5, blocksize=8)
    assert torch.equal(masks["0.weight"], keep0) and torch.equal(masks["2.weight"], keep2)
    torch.testing.assert_close(masks.weights["2.weight"], w2, rtol=1e-4, atol=1e-5)
    # on the dense layer 1 outputs instead, layer 2 would come out differently
    hd = model[1](model[0](x)).detach()
    _, w2_dense = sg.prune_layer(model[2].weight, 2 * hd.T @ hd, amount=0.5, blocksize=8)
    assert not torch.allclose(w2_dense, w2, atol=1e-3)


@pytest.mark.parametrize("vit", ["hf_vit", "timm_vit", "tv_vit"])
def test_vit_block_cache_equals_whole_model_runs(vit, request, images):
    """The cached block inputs give exactly what whole-model forwards per layer give."""
    model = request.getfixturevalue(vit)
    before = copy.deepcopy(model.state_dict())
    include = (nn.Linear, nn.Conv2d)
    masks = sp.prune(model, "sparsegpt", pattern="2:4", calibration=[images, images[:1]], include=include)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # the model is untouched
    slow, slow_w = sg.sparsegpt(model, collect_targets(model, include), [images, images[:1]],
                                lambda p: {"pattern": (2, 4)}, use_blocks=False)
    assert list(masks) == [t.param for t in collect_targets(model, include)] and slow.keys() == masks.keys()
    for name in masks:
        assert torch.equal(masks[name], slow[name]), name
        torch.testing.assert_close(masks.weights[name], slow_w[name], rtol=1e-4, atol=1e-5)
        keep = masks[name].reshape(masks[name].shape[0], -1, 4)
        assert (keep.sum(-1) == 2).all(), name
        assert (masks.weights[name][~masks[name]] == 0).all()
    if vit == "tv_vit":  # nn.MultiheadAttention's out_proj is reached through its attention call
        assert any(n.endswith("out_proj.weight") for n in masks)


def test_apply_convert_save_load_use_the_weights(hf_vit, images, tmp_path):
    masks = sp.prune(hf_vit, "sparsegpt", amount=0.5, calibration=[images])
    assert set(masks.weights) == set(masks) and masks.info["method"] == "sparsegpt"
    pruned = masks.apply(copy.deepcopy(hf_vit))
    params = dict(pruned.named_parameters())
    for name in masks:
        assert torch.equal(params[name], masks.weights[name])
    with torch.no_grad():
        want = pruned(images).logits
        plain = masks.without_weights().apply(copy.deepcopy(hf_vit))(images).logits
        assert not torch.allclose(plain, want, atol=1e-4)  # reconstruction changes the function
        for fmt in ("csr", "dense"):
            fast = sp.convert(hf_vit, masks, format=fmt, backend="torch")
            torch.testing.assert_close(fast(images).logits, want, rtol=1e-4, atol=1e-5)
    path = tmp_path / "m.safetensors"
    masks.save(path)
    back = sp.MaskSet.load(path)
    assert list(back) == list(masks) and back.weights.keys() == masks.weights.keys()
    assert all(torch.equal(back[k], masks[k]) and torch.equal(back.weights[k], masks.weights[k]) for k in masks)
    assert back.info == masks.info
    # torch.nn.utils.prune-style attach writes them too
    attached = masks.attach(copy.deepcopy(hf_vit))
    with torch.no_grad():
        torch.testing.assert_close(attached(images).logits, want)


def test_maskset_weights_and_stacking():
    mask = torch.tensor([[True, False], [False, True]])
    a = sp.MaskSet({"w": mask, "v": mask}, weights={"w": torch.ones(2, 2)})
    b = sp.MaskSet({"w": torch.ones(2, 2, dtype=torch.bool)}, weights={"w": torch.full((2, 2), 3.0)})
    assert torch.equal((a & b).weights["w"], b.weights["w"])  # the later round's weights win
    assert torch.equal((b & a).weights["w"], a.weights["w"])
    c = a & sp.MaskSet({"w": torch.tensor([[True, True], [False, False]])})  # mask-only round on top
    assert torch.equal(c.weights["w"], a.weights["w"]) and torch.equal(c["w"], torch.tensor([[True, False], [False, False]]))
    assert not a.without_weights().weights and "1 reconstructed" in repr(a)
    with pytest.raises(TypeError):
        a.weights["w"] = torch.zeros(2, 2)  # read-only
    with pytest.raises(ValueError, match="no mask"):
        sp.MaskSet({"w": mask}, weights={"x": torch.ones(2, 2)})
    with pytest.raises(ValueError, match="shape"):
        sp.MaskSet({"w": mask}, weights={"w": torch.ones(3)})
    with pytest.raises(TypeError, match="floating"):
        sp.MaskSet({"w": mask}, weights={"w": torch.ones(2, 2, dtype=torch.int64)})


def test_load_rejects_bad_weights(tmp_path):
    import json

    from safetensors.torch import save_file

    path = str(tmp_path / "bad.safetensors")
    meta = {"sparse_prune_weights": json.dumps({"weight:w": "w"})}
    save_file({"w": torch.ones(2, 2, dtype=torch.bool), "weight:w": torch.ones(3)}, path, metadata=meta)
    with pytest.raises(ValueError, match="shape"):
        sp.MaskSet.load(path)
    save_file({"w": torch.ones(2, 2, dtype=torch.bool), "weight:w": torch.ones(2, 2, dtype=torch.int32)},
              path, metadata=meta)
    with pytest.raises(ValueError, match="floating"):
        sp.MaskSet.load(path)


def test_finetune_starts_from_the_reconstructed_weights():
    from torch.utils.data import TensorDataset

    from sparse_prune.bench.train import train

    model = _mlp()
    x = torch.randn(64, 16)
    data = TensorDataset(x, torch.randint(0, 8, (64,)))
    masks = sp.prune(model, "sparsegpt", amount=0.5, calibration=[x])
    tuned = copy.deepcopy(model)
    train(tuned, data, epochs=1, lr=1e-5, masks=masks)
    for name, param in tuned.named_parameters():
        if name in masks:
            assert (param[~masks[name]] == 0).all()
            torch.testing.assert_close(param.detach(), masks.weights[name], atol=1e-3, rtol=0)
            assert not torch.equal(param.detach(), masks.weights[name])  # trained, not overwritten


# ---------------------------------------------------------------------------------------
# Bad input


class _Branchy(nn.Module):
    def __init__(self):
        super().__init__()
        self.used, self.unused = nn.Linear(8, 8), nn.Linear(8, 8)

    def forward(self, x):
        return self.used(x)


@pytest.mark.parametrize("model, kw, exc, words", [
    (_mlp(), {"amount": 0.5}, ValueError, "calibration="),
    (_mlp(), {"amount": 0.5, "calibration": []}, ValueError, "calibration is empty"),
    (_Branchy(), {"amount": 0.5, "calibration": [torch.randn(2, 8)]}, ValueError, "never reached 1 layer.*unused"),
    (nn.Linear(6, 3), {"pattern": "2:4", "calibration": [torch.randn(2, 6)]}, ValueError, "not divisible by M = 4"),
    (_mlp(), {"pattern": "2:4", "blocksize": 6, "calibration": [torch.randn(2, 16)]}, ValueError, "blocksize"),
    (_mlp(), {"amount": 0.5, "blocksize": 0, "calibration": [torch.randn(2, 16)]}, ValueError, "blocksize"),
    (_mlp(), {"amount": 0.5, "percdamp": -1.0, "calibration": [torch.randn(2, 16)]}, ValueError, "percdamp"),
    (_mlp(), {"amount": 0.5, "scope": "global", "calibration": [torch.randn(2, 16)]}, ValueError, "local"),
    (_mlp(), {"amount": 0.5, "pattern": "2:4", "calibration": [torch.randn(2, 16)]}, ValueError, "either"),
    (_mlp(), {"pattern": "2:4", "per_layer": {"0": 0.3}, "calibration": [torch.randn(2, 16)]}, ValueError,
     "per_layer"),
    (nn.Linear(8, 3), {"amount": 0.5, "percdamp": 0.0, "calibration": [torch.randn(2, 8)]}, ValueError,
     "percdamp"),
    (nn.Sequential(nn.LayerNorm(4), nn.Linear(4, 2)), {"amount": 0.5, "include": (nn.LayerNorm,),
                                                      "calibration": [torch.randn(2, 4)]}, ValueError, "never"),
])
def test_bad_input_names_the_argument(model, kw, exc, words):
    state = copy.deepcopy(model.state_dict())
    with pytest.raises(exc, match=words):
        sp.prune(model, "sparsegpt", **kw)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())


def test_options_only_for_sparsegpt():
    with pytest.raises(ValueError, match="sparsegpt"):
        sp.prune(_mlp(), "l1_unstructured", amount=0.5, blocksize=64)


def test_conv_weights_use_im2col_inputs():
    """A Conv2d is pruned as GEMM rows [out, in·kh·kw] on its unfolded inputs; grouped convs are refused."""
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 4, 2, stride=2)
    x = torch.randn(5, 3, 8, 8)
    masks = sp.prune(conv, "sparsegpt", pattern="2:4", calibration=[x], include=(nn.Conv2d,))
    cols = nn.functional.unfold(x, 2, stride=2).transpose(1, 2).reshape(-1, 12)
    keep, new = sg.prune_layer(conv.weight.reshape(4, -1), 2 * cols.T @ cols, pattern=(2, 4))
    assert torch.equal(masks["weight"], keep.view(4, 3, 2, 2))
    torch.testing.assert_close(masks.weights["weight"], new.view(4, 3, 2, 2), rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="groups=3"):
        sp.prune(nn.Conv2d(3, 3, 2, groups=3), "sparsegpt", amount=0.5, calibration=[x], include=(nn.Conv2d,))


class _SharedInput(nn.Module):
    """q and k read the same tensor (one stage), out reads their product (the next stage)."""

    def __init__(self):
        super().__init__()
        self.q, self.k, self.out = nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 4)

    def forward(self, x):
        return self.out(self.q(x) * self.k(x))


def test_layers_sharing_an_input_share_a_stage():
    torch.manual_seed(0)
    model = _SharedInput().eval()
    x = torch.randn(40, 8)
    masks = sp.prune(model, "sparsegpt", amount=0.5, calibration=[x])
    H = 2 * x.T @ x
    _, wq = sg.prune_layer(model.q.weight, H, amount=0.5)
    _, wk = sg.prune_layer(model.k.weight, H, amount=0.5)
    torch.testing.assert_close(masks.weights["q.weight"], wq)
    torch.testing.assert_close(masks.weights["k.weight"], wk)
    h = (x @ wq.T + model.q.bias) * (x @ wk.T + model.k.bias)
    _, wo = sg.prune_layer(model.out.weight, 2 * h.T @ h, amount=0.5)
    torch.testing.assert_close(masks.weights["out.weight"], wo, rtol=1e-4, atol=1e-5)


def test_convert_auto_and_shrink_compile_the_weights(hf_vit, images):
    masks = sp.prune(hf_vit, "sparsegpt", amount=0.5, calibration=[images])
    with torch.no_grad():
        want = masks.apply(copy.deepcopy(hf_vit))(images).logits
        for kw in ({"format": "auto", "example_inputs": images}, {"format": "shrink"}):
            with pytest.warns(UserWarning) if kw["format"] == "shrink" else contextlib.nullcontext():
                fast = sp.convert(hf_vit, masks, backend="torch", **kw)
            torch.testing.assert_close(fast(images).logits, want, rtol=1e-4, atol=1e-5)
