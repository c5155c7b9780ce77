"""Test rules: Triton runs through its interpreter without CUDA; `gpu` tests skip cleanly."""

import os

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    # Must be set before anything imports Triton, so every Triton kernel runs on the CPU.
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_collection_modifyitems(config, items):
    if HAS_CUDA:
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def hf_vit():
    """A tiny transformers ViTForImageClassification (random weights, no hub)."""
    from transformers import ViTConfig, ViTForImageClassification

    torch.manual_seed(0)
    cfg = ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                    image_size=32, patch_size=8, num_labels=10)
    return ViTForImageClassification(cfg).eval()


@pytest.fixture
def timm_vit():
    import timm

    torch.manual_seed(0)
    return timm.models.vision_transformer.VisionTransformer(
        img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=4, mlp_ratio=2.0, num_classes=10
    ).eval()


@pytest.fixture
def tv_vit():
    from torchvision.models.vision_transformer import VisionTransformer

    torch.manual_seed(0)
    return VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=4, hidden_dim=32,
                             mlp_dim=64, num_classes=10).eval()


@pytest.fixture
def images():
    return torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))


REFERENCE_LINEARS = ("csr_linear", "bsr_linear", "semi24_linear", "shrunk_linear")


@pytest.fixture
def no_reference(monkeypatch):
    """Make the reference linear ops raise: a Triton/CUDA kernel test whose kernel body was
    silently swapped for the reference (or an op that fell back to it) then fails. Oracles in
    those tests use ``F.linear`` on the masked dense weight instead."""
    from sparse_prune.kernels import reference

    def refuse(name):
        def run(*args, **kwargs):
            raise AssertionError(f"reference.{name} ran inside a kernel test: the kernel under test "
                                 "fell back to the pure-PyTorch reference")
        return run

    for name in REFERENCE_LINEARS:
        monkeypatch.setattr(reference, name, refuse(name))
