"""sp.save / sp.load: converted models rebuilt on a fresh skeleton, bad checkpoints refused."""

import copy
import json
import os
import warnings

import pytest
import torch
from safetensors.torch import load_file, save_file

import sparse_prune as sp

RECIPES = {
    "dense": ("l1_unstructured", {"amount": 0.5}, {}),
    "csr": ("l1_unstructured", {"amount": 0.9}, {}),
    "bsr": ("l1_unstructured", {"amount": 0.7}, {"block": (16, 8)}),
    "2:4": ("nm", {}, {}),
    "shrink": ("ln_structured", {"amount": 0.5, "coupled": True}, {}),
}


def _logits(out):
    return out.logits if hasattr(out, "logits") else out


def _fresh(model):
    """A skeleton of the same architecture with different random weights."""
    skeleton = copy.deepcopy(model)
    with torch.no_grad():
        for p in skeleton.parameters():
            p.normal_()
    return skeleton


@pytest.mark.parametrize("fixture", ["hf_vit", "timm_vit", "tv_vit"])
@pytest.mark.parametrize("fmt", list(RECIPES))
def test_save_load_roundtrip(fixture, fmt, request, images, tmp_path):
    model = request.getfixturevalue(fixture)
    method, kw, fkw = RECIPES[fmt]
    masks = sp.prune(model, method, **kw)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # every layer converts (torchvision's MHA out_proj too)
        fast = sp.convert(model, masks, format=fmt, **fkw)
    if fmt != "shrink":  # coupled shrink cuts the blocks physically instead
        assert sum(isinstance(m, sp.SparseLinear) for m in fast.modules()) == len(masks)
    sp.save(fast, tmp_path)
    loaded = sp.load(_fresh(model), tmp_path)
    assert torch.equal(_logits(loaded(images)), _logits(fast(images)))
    assert sp.report(loaded) == sp.report(fast)


def test_load_without_bias(images, tmp_path):
    from transformers import ViTConfig, ViTForImageClassification

    torch.manual_seed(0)
    cfg = ViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=64,
                    image_size=32, patch_size=8, num_labels=10, qkv_bias=False)
    model = ViTForImageClassification(cfg).eval()
    fast = sp.convert(model, sp.prune(model, "l1_unstructured", amount=0.8), format="csr")
    assert fast.vit.layers[0].attention.q_proj.bias is None
    sp.save(fast, tmp_path)
    loaded = sp.load(ViTForImageClassification(cfg).eval(), tmp_path)
    assert torch.equal(loaded(images).logits, fast(images).logits)


@pytest.fixture
def saved(hf_vit, tmp_path):
    masks = sp.prune(hf_vit, "ln_structured", amount=0.5, coupled=True)
    sp.save(sp.convert(hf_vit, masks, format="shrink", coupled=False), tmp_path)
    return tmp_path


def _edit_manifest(path, fn):
    with open(path / "manifest.json") as fh:
        manifest = json.load(fh)
    fn(manifest)
    with open(path / "manifest.json", "w") as fh:
        json.dump(manifest, fh)


def test_newer_manifest_refused(saved, hf_vit):
    _edit_manifest(saved, lambda m: m.update(format_version=99))
    with pytest.raises(ValueError, match="newer sparse_prune"):
        sp.load(hf_vit, saved)


def test_broken_manifest_refused(saved, hf_vit):
    (saved / "manifest.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        sp.load(hf_vit, saved)
    (saved / "manifest.json").write_text(json.dumps({"format_version": 1}))
    with pytest.raises(ValueError, match="'groups'"):
        sp.load(hf_vit, saved)


def test_missing_checkpoint(tmp_path, hf_vit):
    with pytest.raises(FileNotFoundError, match="manifest.json"):
        sp.load(hf_vit, tmp_path / "nowhere")


def test_other_architecture_refused(saved, timm_vit):
    with pytest.raises(ValueError, match="architecture"):
        sp.load(timm_vit, saved)


def test_malformed_arrays_refused(saved, hf_vit):
    from safetensors import safe_open

    path = os.path.join(saved, "model.safetensors")
    with safe_open(path, framework="pt") as fh:
        meta = fh.metadata()  # keep the manifest's token: only the array is tampered with
    tensors = load_file(path)
    key = "vit.layers.0.mlp.fc1.in_index"
    tensors[key] = tensors[key].flip(0).contiguous()  # no longer increasing
    save_file(tensors, path, metadata=meta)
    with pytest.raises(ValueError, match="in_index"):
        sp.load(hf_vit, saved)


def test_save_rejects_non_module(tmp_path):
    with pytest.raises(TypeError, match="model"):
        sp.save({"a": torch.zeros(1)}, tmp_path)


@pytest.mark.skipif(not sp.has_cuda_extension(), reason="needs the compiled extension")
def test_checkpoint_saved_for_cuda_loads_on_a_cpu_machine(hf_vit, images, tmp_path):
    masks = sp.prune(hf_vit, "l1_unstructured", amount=0.9)
    fast = sp.convert(hf_vit, masks, format="csr", backend="cuda")  # fits; would run after .to("cuda")
    assert {m.requested_backend for m in fast.modules() if isinstance(m, sp.SparseLinear)} == {"cuda"}
    sp.save(fast, tmp_path)
    with pytest.warns(UserWarning, match="cannot run here and use backend='auto'"):
        loaded = sp.load(_fresh(hf_vit), tmp_path)
    assert {m.backend for m in loaded.modules() if isinstance(m, sp.SparseLinear)} == {"torch"}
    expected = masks.apply(copy.deepcopy(hf_vit))(images).logits
    torch.testing.assert_close(loaded(images).logits, expected, rtol=1e-5, atol=1e-5)


def test_a_bad_entry_late_in_the_manifest_leaves_the_skeleton_untouched(hf_vit, tmp_path):
    masks = sp.prune(hf_vit, "ln_structured", amount=0.5, coupled=True)
    sp.save(sp.convert(hf_vit, masks, format="shrink"), tmp_path)
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    last = list(manifest["sparse_linear"])[-1] if manifest["sparse_linear"] else None
    manifest["dense_shapes"]["vit.no_such_module"] = [4, 4]  # found only after the groups were cut
    if last:
        manifest["sparse_linear"][last]["static"]["shape"] = [1, 1]
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    skeleton = _fresh(hf_vit)
    before = {k: v.clone() for k, v in skeleton.state_dict().items()}
    modules_before = [(n, type(m)) for n, m in skeleton.named_modules()]
    with pytest.raises(ValueError):
        sp.load(skeleton, tmp_path)
    after = skeleton.state_dict()
    assert list(after) == list(before) and all(torch.equal(after[k], before[k]) for k in before)
    assert [(n, type(m)) for n, m in skeleton.named_modules()] == modules_before
    assert skeleton.vit.layers[0].attention.q_proj.out_features == 32  # not cut


def test_save_is_crash_safe_and_pairs_are_checked(saved, hf_vit, tmp_path, monkeypatch):
    """A save killed while writing leaves the old checkpoint loadable; new weights beside an old
    manifest (killed between the two renames) are refused, not loaded into wrong logits."""
    import shutil

    from sparse_prune import atomic, checkpoint

    before = sorted(os.listdir(saved))
    reference = sp.load(copy.deepcopy(hf_vit), saved)

    def killed(path, write):  # the manifest write dies half-way
        raise KeyboardInterrupt

    real = atomic.write_temp
    monkeypatch.setattr(atomic, "write_temp", lambda path, write: real(path, write)
                        if str(path).endswith(".safetensors") else killed(path, write))
    with pytest.raises(KeyboardInterrupt):
        checkpoint.save(reference, saved)
    monkeypatch.setattr(atomic, "write_temp", real)
    assert sorted(os.listdir(saved)) == before  # no temporary file left, old files untouched
    sp.load(copy.deepcopy(hf_vit), saved)  # still whole
    other = tmp_path / "other"
    sp.save(reference, other)
    shutil.copy(other / "model.safetensors", os.path.join(saved, "model.safetensors"))
    with pytest.raises(ValueError, match="does not belong to the manifest"):
        sp.load(copy.deepcopy(hf_vit), saved)
