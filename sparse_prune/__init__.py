"""sparse_prune: prune vision transformers and turn the masks into real speed.

Public API (see README): ``prune`` -> ``MaskSet``; ``sensitivity``; ``models.vit``;
``has_cuda_extension``. Importing never fails, with or without the compiled extension.
"""

from sparse_prune import formats, models, ops
from sparse_prune.attention import set_attention
from sparse_prune.checkpoint import load, save
from sparse_prune.convert import convert
from sparse_prune.hf import from_pretrained, save_pretrained
from sparse_prune.masks import MaskSet
from sparse_prune.nn import SparseLinear, SparseMLP
from sparse_prune.ops import extension_error, has_cuda_extension
from sparse_prune.pruning import METHODS, prune
from sparse_prune.report import format_report, report
from sparse_prune.sensitivity import sensitivity
from sparse_prune.structure import find_groups

__version__ = "0.1.0"

__all__ = [
    "METHODS",
    "MaskSet",
    "SparseLinear",
    "SparseMLP",
    "convert",
    "format_report",
    "from_pretrained",
    "report",
    "extension_error",
    "find_groups",
    "formats",
    "has_cuda_extension",
    "load",
    "models",
    "ops",
    "prune",
    "save",
    "save_pretrained",
    "sensitivity",
    "set_attention",
]
