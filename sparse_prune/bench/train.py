"""Training, masked finetuning and top-1 evaluation for the accuracy study."""

from __future__ import annotations

import math
import os
import time
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from sparse_prune.masks import MaskSet

# The embedded default: a small transformers ViT on 8×8 digits, 2×2 patches (16 tokens).
DIGITS_VIT = dict(hidden_size=64, num_hidden_layers=4, num_attention_heads=4, intermediate_size=128,
                  image_size=8, patch_size=2, num_channels=1, num_labels=10,
                  hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)


def logits_of(out: Any) -> torch.Tensor:
    return out.logits if hasattr(out, "logits") else out


@torch.no_grad()
def evaluate(model: nn.Module, data: Dataset, batch_size: int = 256) -> float:
    """Top-1 accuracy of ``model`` (eval mode) on ``data``, in [0, 1]."""
    model.eval()
    correct = total = 0
    for x, y in DataLoader(data, batch_size=batch_size):
        correct += int((logits_of(model(x)).argmax(-1) == y).sum())
        total += len(y)
    return correct / max(1, total)


def _mask_gradients(model: nn.Module, masks: MaskSet) -> list[torch.utils.hooks.RemovableHandle]:
    params = dict(model.named_parameters())
    missing = [name for name in masks if name not in params]
    if missing:
        raise ValueError(f"masks name parameters the model does not have: {missing[:3]}")
    handles = []
    for name, mask in masks.items():
        keep = mask.to(device=params[name].device, dtype=params[name].dtype)
        handles.append(params[name].register_hook(lambda g, keep=keep: g * keep))
    return handles


def train(model: nn.Module, data: Dataset, epochs: int, lr: float = 1e-3, batch_size: int = 64,
          masks: MaskSet | None = None, weight_decay: float = 0.05, seed: int = 0,
          desc: str = "train") -> float:
    """AdamW + linear warm-up (5% of steps) + cosine decay, cross-entropy; returns seconds.

    With ``masks``, pruned weights start at zero and stay exactly zero: their gradients are
    multiplied by the mask (a hook) and the mask is re-applied after every step, so neither
    momentum nor weight decay can revive them. Reconstructed weights (``masks.weights``,
    SparseGPT) are the starting point: written once, before the first step.
    """
    if epochs < 0:
        raise ValueError(f"epochs must be >= 0, got {epochs}")
    start = time.perf_counter()
    if epochs == 0:
        return 0.0
    gen = torch.Generator().manual_seed(seed)
    loader = DataLoader(data, batch_size=batch_size, shuffle=True, generator=gen)
    steps = epochs * len(loader)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=weight_decay)
    warm = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: (s + 1) / warm if s < warm else 0.5 * (1 + math.cos(math.pi * (s - warm) / max(1, steps - warm))))
    handles = []
    if masks is not None:
        masks.apply(model)  # writes the reconstructed weights, if any, once
        masks = masks.without_weights()
        handles = _mask_gradients(model, masks)
    loss_fn = nn.CrossEntropyLoss(label_smoothing=0.1)
    model.train()
    try:
        for _ in tqdm(range(epochs), desc=desc, leave=False):
            for x, y in loader:
                opt.zero_grad(set_to_none=True)
                loss_fn(logits_of(model(x)), y).backward()
                opt.step()
                sched.step()
                if masks is not None:
                    masks.apply(model)
    finally:
        for h in handles:
            h.remove()
        model.eval()
    return time.perf_counter() - start


def digits_vit(train_data: Dataset, cache_dir: str | os.PathLike, epochs: int = 40, seed: int = 0) -> nn.Module:
    """The default study model, trained on ``train_data`` once and cached in ``cache_dir``."""
    from safetensors.torch import load_file, save_file
    from transformers import ViTConfig, ViTForImageClassification

    torch.manual_seed(seed)
    model = ViTForImageClassification(ViTConfig(**DIGITS_VIT)).eval()
    path = os.path.join(cache_dir, f"digits_vit_e{epochs}_s{seed}.safetensors")
    if os.path.isfile(path):
        model.load_state_dict(load_file(path))
        return model
    train(model, train_data, epochs, lr=2e-3, seed=seed, desc="train digits ViT")
    os.makedirs(cache_dir, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, path)
    return model
