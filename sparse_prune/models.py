"""ViT builders that work offline: architecture from a config, weights only from local files."""

from __future__ import annotations

import os
from typing import Any

import torch
from torch import nn

SOURCES = ("transformers", "timm", "torchvision")

# name -> (hidden, depth, heads, mlp, patch, image)
ARCHS: dict[str, tuple[int, int, int, int, int, int]] = {
    "vit_tiny_patch16_224": (192, 12, 3, 768, 16, 224),
    "vit_small_patch16_224": (384, 12, 6, 1536, 16, 224),
    "vit_base_patch16_224": (768, 12, 12, 3072, 16, 224),
    "vit_large_patch16_224": (1024, 24, 16, 4096, 16, 224),
}


def vit(
    name: str = "vit_base_patch16_224",
    source: str = "transformers",
    weights: str | os.PathLike | None = None,
    num_classes: int = 1000,
    **overrides: Any,
) -> nn.Module:
    """Build a ViT without any download; ``vit_base_patch16_224`` = ``google/vit-base-patch16-224``.

    Args:
        name: one of ``ARCHS``.
        source: ``"transformers"`` (``ViTForImageClassification``), ``"timm"`` or
            ``"torchvision"``.
        weights: optional local state dict (``.safetensors``, ``.bin``/``.pt``/``.pth``),
            loaded strictly.
        num_classes: classifier width.
        overrides: keyword arguments forwarded to the source's config/constructor
            (e.g. ``num_hidden_layers=2`` for transformers, ``depth=2`` for timm).

    Returns the model in eval mode with random (or the given) weights.
    """
    if name not in ARCHS:
        raise ValueError(f"unknown ViT {name!r}; known: {', '.join(ARCHS)}")
    if source not in SOURCES:
        raise ValueError(f"source must be one of {SOURCES}, got {source!r}")
    for key in ("num_hidden_layers", "depth", "num_layers"):
        if key in overrides and (isinstance(overrides[key], bool) or not isinstance(overrides[key], int)
                                 or overrides[key] < 1):
            raise ValueError(f"{key} must be an int >= 1 (the number of blocks), got {overrides[key]!r}")
    hidden, depth, heads, mlp, patch, image = ARCHS[name]
    if source == "transformers":
        from transformers import ViTConfig, ViTForImageClassification

        cfg = dict(hidden_size=hidden, num_hidden_layers=depth, num_attention_heads=heads,
                   intermediate_size=mlp, patch_size=patch, image_size=image, num_labels=num_classes)
        cfg.update(overrides)
        model = ViTForImageClassification(ViTConfig(**cfg))
    elif source == "timm":
        import timm

        kw = dict(embed_dim=hidden, depth=depth, num_heads=heads, mlp_ratio=mlp / hidden,
                  patch_size=patch, img_size=image, num_classes=num_classes)
        kw.update(overrides)
        model = timm.models.vision_transformer.VisionTransformer(**kw)
    else:
        from torchvision.models.vision_transformer import VisionTransformer

        kw = dict(image_size=image, patch_size=patch, num_layers=depth, num_heads=heads,
                  hidden_dim=hidden, mlp_dim=mlp, num_classes=num_classes)
        kw.update(overrides)
        model = VisionTransformer(**kw)
    if weights is not None:
        try:
            model.load_state_dict(load_state_dict(weights), strict=True)
        except RuntimeError as exc:
            raise ValueError(f"{os.fspath(weights)}: does not fit {name} ({source}): {str(exc).splitlines()[0]} ...") from exc
    return model.eval()


def load_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read a local checkpoint: safetensors, or a torch pickle (``weights_only=True``)."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"weights file {path!r} does not exist")
    if path.endswith(".safetensors"):
        from sparse_prune.files import read_safetensors

        return read_safetensors(path, "cpu", "weights file")[0]
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # truncated, corrupted, not a torch file, or pickled code weights_only refuses
        raise ValueError(f"{path}: not a readable torch state dict (truncated, corrupted, another format, or "
                         f"objects weights_only=True refuses): {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
                         ) from exc
    if isinstance(state, dict) and "state_dict" in state:
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{path!r} does not hold a state dict (name -> tensor)")
    return state
