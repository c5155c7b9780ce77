"""sparse_prune: prune vision transformers and turn the masks into real speed.

Public API (see README): ``prune`` -> ``MaskSet``; ``sensitivity``; ``models.vit``;
``has_cuda_extension``. Importing never fails, with or without the compiled extension.
"""

from sparse_prune import models, ops
from sparse_prune.masks import MaskSet
from sparse_prune.ops import extension_error, has_cuda_extension
from sparse_prune.pruning import METHODS, prune
from sparse_prune.sensitivity import sensitivity
from sparse_prune.structure import find_groups

__version__ = "0.1.0"

__all__ = [
    "METHODS",
    "MaskSet",
    "extension_error",
    "find_groups",
    "has_cuda_extension",
    "models",
    "ops",
    "prune",
    "sensitivity",
]
