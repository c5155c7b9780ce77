"""Evaluation data for the accuracy study: the bundled digits set or a local ImageFolder.

``load_data(spec, image_size)`` returns ``(train, test, num_classes, channels)`` as torch
Datasets yielding ``(image [C, H, W] float, label int)``:

* ``"digits"``: scikit-learn's bundled 8×8 digits (1,797 images, no download), one channel,
  pixel values 0..16 scaled to [-1, 1], a fixed stratified 80/20 split (seed 0), resized
  (bilinear) to ``image_size`` when it is not 8;
* ``"imagefolder:PATH"``: ``PATH/train`` and ``PATH/val`` class folders when both exist
  (else all of ``PATH`` is the test set and there is no train split), preprocessed as the
  HF ViT processor does for ``google/vit-base-patch16-224``: RGB, resize the shorter side to
  ``image_size``, center crop, scale to [0, 1], normalize with mean = std = 0.5.
"""

from __future__ import annotations

import os

import torch
from torch.utils.data import Dataset, TensorDataset


def digits(image_size: int = 8, seed: int = 0) -> tuple[Dataset, Dataset]:
    try:
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split
    except ImportError as exc:  # pragma: no cover - exercised only without the extra
        raise ImportError("the digits data set needs scikit-learn: pip install 'sparse_prune[study]'") from exc
    bunch = load_digits()
    x = torch.tensor(bunch.images, dtype=torch.float32)[:, None] / 8.0 - 1.0  # [N, 1, 8, 8] in [-1, 1]
    y = torch.tensor(bunch.target, dtype=torch.long)
    if image_size != 8:
        x = torch.nn.functional.interpolate(x, size=(image_size, image_size), mode="bilinear", align_corners=False)
    train_idx, test_idx = train_test_split(torch.arange(len(y)).numpy(), test_size=0.2, random_state=seed,
                                           stratify=y.numpy())
    train_idx, test_idx = torch.as_tensor(train_idx), torch.as_tensor(test_idx)
    return TensorDataset(x[train_idx], y[train_idx]), TensorDataset(x[test_idx], y[test_idx])


def imagefolder(path: str, image_size: int) -> tuple[Dataset | None, Dataset, list[str]]:
    from torchvision import datasets, transforms

    if not os.path.isdir(path):
        raise ValueError(f"data: imagefolder path {path!r} is not a directory")
    tf = transforms.Compose([
        transforms.Lambda(lambda im: im.convert("RGB")),
        transforms.Resize(image_size),
        transforms.CenterCrop(image_size),
        transforms.ToTensor(),
        transforms.Normalize([0.5] * 3, [0.5] * 3),
    ])
    train_dir, val_dir = os.path.join(path, "train"), os.path.join(path, "val")
    if os.path.isdir(train_dir) and os.path.isdir(val_dir):
        train, test = datasets.ImageFolder(train_dir, tf), datasets.ImageFolder(val_dir, tf)
        if train.classes != test.classes:
            raise ValueError(f"data: {train_dir} and {val_dir} hold different class folders")
        return train, test, test.classes
    test = datasets.ImageFolder(path, tf)
    return None, test, test.classes


def load_data(spec: str, image_size: int) -> tuple[Dataset | None, Dataset, int, int]:
    """``(train or None, test, num_classes, channels)`` for ``"digits"`` or ``"imagefolder:PATH"``."""
    if spec == "digits":
        train, test = digits(image_size)
        return train, test, 10, 1
    if spec.startswith("imagefolder:"):
        train, test, classes = imagefolder(spec.split(":", 1)[1], image_size)
        return train, test, len(classes), 3
    raise ValueError(f"data must be 'digits' or 'imagefolder:PATH', got {spec!r}")
