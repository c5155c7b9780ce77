"""The accuracy study: data, masked finetuning, the study rows and the `accuracy` CLI."""

import json

import pytest
import torch
from torch.utils.data import TensorDataset

import sparse_prune as sp
from sparse_prune import cli
from sparse_prune.bench import accuracy as study
from sparse_prune.bench.data import imagefolder, load_data
from sparse_prune.bench.train import _mask_gradients, evaluate, train


@pytest.fixture
def digits_small():
    """A tiny digits ViT (untrained) and 200/100 digits images: fast, real data."""
    from transformers import ViTConfig, ViTForImageClassification

    torch.manual_seed(0)
    cfg = ViTConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
                    image_size=8, patch_size=4, num_channels=1, num_labels=10)
    train_data, test_data, classes, channels = load_data("digits", 8)
    assert (classes, channels) == (10, 1) and len(train_data) + len(test_data) == 1797
    x, y = train_data.tensors
    assert x.shape[1:] == (1, 8, 8) and x.min() >= -1 and x.max() <= 1
    small_train = TensorDataset(x[:200], y[:200])
    small_test = TensorDataset(*(t[:100] for t in test_data.tensors))
    return ViTForImageClassification(cfg).eval(), small_train, small_test


def test_digits_resize_and_split_are_fixed():
    a, _, _, _ = load_data("digits", 8)
    b, _, _, _ = load_data("digits", 8)
    assert torch.equal(a.tensors[1], b.tensors[1])
    big, _, _, _ = load_data("digits", 16)
    assert big.tensors[0].shape[1:] == (1, 16, 16)
    with pytest.raises(ValueError, match="digits"):
        load_data("mnist", 8)


def test_gradients_are_masked(digits_small):
    model, train_data, _ = digits_small
    masks = sp.prune(model, "l1_unstructured", amount=0.5)
    handles = _mask_gradients(model, masks)
    x, y = train_data.tensors
    torch.nn.functional.cross_entropy(model(x[:16]).logits, y[:16]).backward()
    params = dict(model.named_parameters())
    for name, mask in masks.items():
        assert params[name].grad[~mask].abs().max() == 0
        assert params[name].grad[mask].abs().max() > 0
    for h in handles:
        h.remove()


def test_finetune_keeps_pruned_weights_zero(digits_small):
    model, train_data, test_data = digits_small
    masks = sp.prune(model, "random_unstructured", amount=0.6)
    train(model, train_data, epochs=2, masks=masks)
    params = dict(model.named_parameters())
    for name, mask in masks.items():
        assert (params[name][~mask] == 0).all()
        assert (params[name][mask] != 0).any()
    with pytest.raises(ValueError, match="epochs"):
        train(model, train_data, epochs=-1)


def test_run_study_rows(digits_small):
    model, train_data, test_data = digits_small
    state = {k: v.clone() for k, v in model.state_dict().items()}
    rows = study.run_study(model, train_data, test_data, model_name="tiny", data_name="digits",
                           methods=["l1_unstructured", "nm", "wanda", "sparsegpt", "block"], amounts=[0.3, 0.5],
                           finetune_epochs=1, iterative=2, progress=False, blocks=[(4, 1), (2, 2)])
    # the model is never modified
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())
    keys = {"model", "data", "method", "pattern", "block", "scope", "amount", "sparsity", "accuracy",
            "dense_accuracy", "finetuned", "epochs", "iterative", "prune_s", "finetune_s"}
    assert all(set(r) == keys for r in rows)
    one_shot = [r for r in rows if not r["finetuned"]]
    assert [(r["method"], r["pattern"], r["block"], r["amount"]) for r in one_shot] == [
        ("l1_unstructured", None, None, 0.3), ("l1_unstructured", None, None, 0.5), ("nm", "2:4", None, 0.5),
        ("wanda", None, None, 0.3), ("wanda", None, None, 0.5), ("wanda", "2:4", None, 0.5),
        ("sparsegpt", None, None, 0.3), ("sparsegpt", None, None, 0.5), ("sparsegpt", "2:4", None, 0.5),
        ("block", None, [4, 1], 0.3), ("block", None, [4, 1], 0.5),
        ("block", None, [2, 2], 0.3), ("block", None, [2, 2], 0.5)]
    for r in one_shot:
        assert abs(r["sparsity"] - r["amount"]) < 0.02  # conv + linears, as the seed prunes
        assert 0 <= r["accuracy"] <= 1
    tuned = [r for r in rows if r["finetuned"]]
    assert len(tuned) == 8 and all(r["iterative"] == 2 and r["epochs"] == 1 for r in tuned)
    assert [r["block"] for r in tuned if r["method"] == "block"] == [[4, 1], [2, 2]]
    # stacked iterative masks reach at least the target
    assert all(r["sparsity"] >= r["amount"] - 0.02 for r in tuned)
    md = study.markdown(rows)
    assert "| wanda 2:4 | 0.50 |" in md and "| sparsegpt 2:4 | 0.50 |" in md
    assert "| block 4x1 | 0.30 |" in md and "| block 2x2 | 0.50 |" in md


@pytest.mark.parametrize("kw,words", [({"methods": ["magic"]}, "methods"), ({"amounts": [1.5]}, "amount"),
                                      ({"iterative": 0}, "iterative"), ({"scope": "row"}, "scope"),
                                      ({"blocks": [(0, 1)]}, "block"), ({"blocks": [(4.0, 1)]}, "block"),
                                      ({"methods": ["block"], "blocks": []}, "blocks")])
def test_run_study_bad_args(digits_small, kw, words):
    model, train_data, test_data = digits_small
    with pytest.raises(ValueError, match=words):
        study.run_study(model, train_data, test_data, model_name="m", data_name="d", progress=False, **kw)
    with pytest.raises(ValueError, match="training data"):
        study.run_study(model, None, test_data, model_name="m", data_name="d", finetune_epochs=1, progress=False)


def _image_folder(root, classes=("cat", "dog"), per_class=3, size=40):
    from PIL import Image

    for split in ("train", "val"):
        for i, cls in enumerate(classes):
            (root / split / cls).mkdir(parents=True)
            for j in range(per_class):
                color = (255, 255, 255) if i == 0 else (10 * j, 0, 0)
                Image.new("RGB", (size + 8 * j, size), color).save(root / split / cls / f"{j}.png")


def test_imagefolder_preprocessing(tmp_path):
    _image_folder(tmp_path)
    train_data, test_data, classes = imagefolder(str(tmp_path), 32)
    assert classes == ["cat", "dog"] and len(train_data) == len(test_data) == 6
    x, y = test_data[0]
    assert x.shape == (3, 32, 32) and y == 0
    torch.testing.assert_close(x, torch.ones_like(x))  # white -> (1 - 0.5) / 0.5
    with pytest.raises(ValueError, match="not a directory"):
        imagefolder(str(tmp_path / "missing"), 32)


def test_cli_accuracy_imagefolder_with_local_checkpoint(tmp_path, capsys):
    from safetensors.torch import save_file

    _image_folder(tmp_path / "data")
    torch.manual_seed(0)
    model = sp.models.vit("vit_tiny_patch16_224", num_classes=2, num_hidden_layers=1)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp_path / "ck.safetensors"))
    rc = cli.main(["accuracy", "--model", "vit_tiny_patch16_224", "--depth", "1", "--weights",
                   str(tmp_path / "ck.safetensors"), "--data", f"imagefolder:{tmp_path / 'data'}",
                   "--methods", "l1_unstructured", "nm", "--amounts", "0.5", "--finetune-epochs", "1",
                   "--keep-classifier", "--out", str(tmp_path / "out")])
    assert rc == 0
    rows = json.loads((tmp_path / "out" / "accuracy.json").read_text())
    assert {r["method"] for r in rows} == {"l1_unstructured", "nm"}
    assert rows[0]["dense_accuracy"] == evaluate(model, imagefolder(str(tmp_path / "data"), 224)[1])
    assert (tmp_path / "out" / "accuracy.md").exists() and (tmp_path / "out" / "accuracy.png").exists()


def test_cli_accuracy_digits_and_errors(tmp_path, capsys):
    rc = cli.main(["accuracy", "--train-epochs", "1", "--methods", "l1_unstructured", "block", "--blocks", "4x1",
                   "--amounts", "0.5", "--finetune-epochs", "1", "--out", str(tmp_path)])
    assert rc == 0
    assert list((tmp_path / "cache").glob("digits_vit_e1_s0.safetensors"))
    rows = json.loads((tmp_path / "accuracy.json").read_text())
    assert [(r["method"], r["block"], r["finetuned"]) for r in rows] == [
        ("l1_unstructured", None, False), ("l1_unstructured", None, True), ("block", [4, 1], False),
        ("block", [4, 1], True)]
    with pytest.raises(SystemExit):
        cli.main(["accuracy", "--blocks", "4x", "--out", str(tmp_path)])
    assert "BMxBK" in capsys.readouterr().err
    assert cli.main(["accuracy", "--model", "vit_tiny_patch16_224", "--out", str(tmp_path)]) == 2
    assert "digits-vit" in capsys.readouterr().err
