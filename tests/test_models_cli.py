"""ViT builders (offline), the sensitivity scan and the `sparse-prune` CLI."""

import json

import pytest
import torch

import sparse_prune as sp
from sparse_prune import cli


@pytest.mark.parametrize("source, key", [("transformers", "num_hidden_layers"), ("timm", "depth"),
                                         ("torchvision", "num_layers")])
def test_vit_builds_offline_and_loads_weights(source, key, tmp_path):
    model = sp.models.vit("vit_tiny_patch16_224", source=source, num_classes=7, **{key: 1})
    x = torch.randn(1, 3, 224, 224)
    out = model(x)
    out = out.logits if hasattr(out, "logits") else out
    assert out.shape == (1, 7)
    from safetensors.torch import save_file

    path = tmp_path / "w.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    again = sp.models.vit("vit_tiny_patch16_224", source=source, num_classes=7, weights=path, **{key: 1})
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), again.state_dict().values(), strict=True))


def test_vit_base_default_is_google_config():
    from transformers import ViTConfig

    ref = ViTConfig()  # google/vit-base-patch16-224 architecture
    model = sp.models.vit(num_classes=1000, num_hidden_layers=1)
    cfg = model.config
    assert (cfg.hidden_size, cfg.num_attention_heads, cfg.intermediate_size, cfg.patch_size, cfg.image_size) == (
        ref.hidden_size, ref.num_attention_heads, ref.intermediate_size, ref.patch_size, ref.image_size)


def test_vit_bad_args(tmp_path):
    with pytest.raises(ValueError, match="unknown ViT"):
        sp.models.vit("resnet50")
    with pytest.raises(ValueError, match="source"):
        sp.models.vit(source="keras")
    with pytest.raises(FileNotFoundError):
        sp.models.vit("vit_tiny_patch16_224", weights=tmp_path / "missing.safetensors", num_hidden_layers=1)


def test_sensitivity_rows_and_restore(hf_vit, images):
    before = {k: v.clone() for k, v in hf_vit.state_dict().items()}
    with torch.no_grad():
        ref = hf_vit(images).logits

    def evaluate(model):
        with torch.no_grad():
            return float((model(images).logits - ref).abs().max())

    rows = sp.sensitivity(hf_vit, "l1_unstructured", [0.5, 0.9], evaluate)
    assert rows[0] == {"layer": None, "amount": 0.0, "sparsity": 0.0, "score": 0.0}
    assert len(rows) == 1 + 2 * 13
    assert all(r["score"] > 0 for r in rows[1:])
    by = {(r["layer"], r["amount"]): r["score"] for r in rows[1:]}
    name = "vit.layers.0.mlp.fc1.weight"
    assert by[(name, 0.9)] > by[(name, 0.5)]
    json.dumps(rows)
    assert all(torch.equal(before[k], v) for k, v in hf_vit.state_dict().items())
    with pytest.raises(ValueError, match="local"):
        sp.sensitivity(hf_vit, "l1_unstructured", [0.5], evaluate, scope="global")


def test_cli_demo_quick(tmp_path, capsys):
    rc = cli.main(["demo", "--model", "vit_tiny_patch16_224", "--depth", "1", "--skip-accuracy",
                   "--out", str(tmp_path)])
    assert rc == 0
    report = (tmp_path / "report.md").read_text()
    assert "## Latency against the dense model" in report and "| 1 | csr | torch | 0.90 |" in report
    assert (tmp_path / "latency" / "latency.json").exists()
    for label, _, _ in cli.DEMO_RECIPES:
        assert label in report
    data = json.loads((tmp_path / "sparsity.json").read_text())
    assert data["nm 2:4"]["overall"] == pytest.approx(0.5)
    assert abs(data["l1_unstructured"]["overall"] - 0.5) < 1e-3
    masks = sp.MaskSet.load(tmp_path / "masks_wanda.safetensors")
    assert masks.info["method"] == "wanda"
    assert "vit.layers.0.mlp.fc1.weight" in capsys.readouterr().out


def test_cli_prune_and_errors(tmp_path, capsys):
    out = tmp_path / "m.safetensors"
    rc = cli.main(["prune", "--model", "vit_tiny_patch16_224", "--depth", "1", "--method", "ln_structured",
                   "--amount", "0.25", "--coupled", "--exclude", "classifier", "--out", str(out)])
    assert rc == 0
    masks = sp.MaskSet.load(out)
    assert masks.info["coupled"] is True
    assert "total" in capsys.readouterr().out
    rc = cli.main(["prune", "--model", "vit_tiny_patch16_224", "--depth", "1", "--method", "l1_unstructured",
                   "--amount", "1.5"])
    assert rc == 2
    assert "amount must be a float in [0, 1]" in capsys.readouterr().err


@pytest.mark.parametrize("fmt,method,extra", [("csr", "l1_unstructured", []), ("shrink", "ln_structured", ["--coupled"]),
                                              ("bsr", "l1_unstructured", [])])
def test_cli_convert_then_report(tmp_path, capsys, fmt, method, extra):
    model_args = ["--model", "vit_tiny_patch16_224", "--depth", "1"]
    masks = str(tmp_path / "m.safetensors")
    assert cli.main(["prune", *model_args, "--method", method, "--amount", "0.8", *extra, "--out", masks]) == 0
    conv = ["convert", *model_args, "--masks", masks, "--format", fmt, "--out", str(tmp_path / "ck")]
    if fmt == "bsr":
        conv += ["--block", "16", "16"]
    assert cli.main(conv) == 0
    capsys.readouterr()
    assert cli.main(["report", str(tmp_path / "ck"), "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    shown = {r["format"] for r in rows}
    assert ("shrink (cut)" if fmt == "shrink" else fmt) in shown
    if fmt != "bsr":  # unstructured 80% leaves a kept weight in nearly every 16x16 block
        assert sum(r["bytes"] for r in rows) < sum(r["dense_bytes"] for r in rows)
    assert cli.main(["report", str(tmp_path / "nowhere")]) == 2
    assert "manifest.json" in capsys.readouterr().err


def test_cli_sparsegpt_prune_then_convert_compiles_its_weights(tmp_path, capsys):
    model_args = ["--model", "vit_tiny_patch16_224", "--depth", "1"]
    masks_path = str(tmp_path / "m.safetensors")
    assert cli.main(["prune", *model_args, "--method", "sparsegpt", "--pattern", "2:4", "--blocksize", "64",
                     "--calibration-batches", "1", "--out", masks_path]) == 0
    masks = sp.MaskSet.load(masks_path)
    assert masks.info["method"] == "sparsegpt" and masks.info["pattern"] == "2:4" and masks.info["blocksize"] == 64
    assert set(masks.weights) == set(masks)
    assert cli.main(["convert", *model_args, "--masks", masks_path, "--format", "2:4", "--backend", "torch",
                     "--out", str(tmp_path / "ck")]) == 0
    torch.manual_seed(0)
    fast = sp.load(sp.models.vit("vit_tiny_patch16_224", num_hidden_layers=1), str(tmp_path / "ck"))
    layer = fast.get_submodule("vit.layers.0.mlp.fc1")
    assert isinstance(layer, sp.SparseLinear) and layer.format_name == "2:4"
    torch.testing.assert_close(layer.weight, masks.weights["vit.layers.0.mlp.fc1.weight"])
    assert cli.main(["prune", *model_args, "--method", "sparsegpt", "--pattern", "2:4", "--blocksize", "6"]) == 2
    assert "blocksize" in capsys.readouterr().err
