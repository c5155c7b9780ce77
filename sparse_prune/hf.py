"""Hugging Face round trips: a converted ``transformers`` model through ``save_pretrained`` and
:func:`from_pretrained`, never silently wrong.

transformers' own ``save_pretrained`` would write the converted state dict (format arrays, cut
shapes) under the dense names, and ``from_pretrained`` would then initialise the sparse layers at
random (a warning in a log) or fail on the shrunk shapes. So ``sp.convert`` and ``sp.load`` give a
converted transformers model an instance ``save_pretrained`` (:func:`save_pretrained`) that
writes, into the folder:

* ``config.json`` — the model's config (the dense architecture, as transformers writes it,
  ``architectures`` filled in) plus a ``"sparse_prune"`` entry saying where the weights are and
  how to load them;
* ``sparse_prune/`` — an ``sp.save`` checkpoint (``model.safetensors`` + ``manifest.json``: the
  formats, and every MLP/head group's unit count, so the shrink needs no config change).

No weights file sits where transformers looks for one (stale ones from an earlier dense save are
removed), so ``AutoModel*.from_pretrained(folder)`` refuses (``OSError``: no model.safetensors)
instead of loading random layers; :func:`from_pretrained` builds the dense skeleton from the
config (random init, nothing downloaded) and ``sp.load``\\s the checkpoint onto it.
"""

from __future__ import annotations

import copy
import functools
import glob
import os
from typing import Any

from torch import nn

SUBDIR = "sparse_prune"
CONFIG_KEY = "sparse_prune"
# files transformers' from_pretrained loads from a folder (stale ones would load silently)
HF_WEIGHTS = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
              "pytorch_model.bin.index.json", "model-*-of-*.safetensors", "pytorch_model-*-of-*.bin")


def is_transformers_model(model: nn.Module) -> bool:
    """A ``transformers.PreTrainedModel`` (checked without importing transformers)."""
    return (hasattr(type(model), "save_pretrained") and hasattr(model, "config")
            and type(model).__module__.startswith("transformers."))


def guard(model: nn.Module) -> nn.Module:
    """Give a transformers ``model`` the instance ``save_pretrained`` of this module (it survives
    ``deepcopy`` and pickling); other models are returned untouched."""
    if is_transformers_model(model):
        model.__dict__["save_pretrained"] = functools.partial(save_pretrained, model)
    return model


def save_pretrained(model: nn.Module, save_directory: str | os.PathLike, **kwargs: Any) -> None:
    """Write a converted transformers ``model`` to ``save_directory`` (see the module docstring);
    :func:`from_pretrained` reads it back. transformers' ``save_pretrained`` keywords that only
    shape its own files (``safe_serialization``, ``max_shard_size``, ``is_main_process``, ...)
    are accepted and have no effect; ``state_dict=`` and ``push_to_hub=True`` are refused
    (``ValueError``): upload the folder itself."""
    from sparse_prune import __version__
    from sparse_prune.checkpoint import save

    if kwargs.get("state_dict") is not None:
        raise ValueError("save_pretrained(state_dict=...) cannot describe a converted model: the sparse "
                         "layers are saved with sp.save's manifest; leave state_dict out")
    if kwargs.get("push_to_hub"):
        raise ValueError("save_pretrained(push_to_hub=True) is not supported for a converted model: save it, "
                         "then upload the folder (config.json + sparse_prune/)")
    if not is_transformers_model(model):
        raise TypeError(f"save_pretrained needs a transformers model, got {type(model).__name__}; use sp.save")
    directory = os.fspath(save_directory)
    if os.path.isfile(directory):
        raise ValueError(f"save_directory {directory!r} is a file, not a folder")
    os.makedirs(directory, exist_ok=True)
    save(model, os.path.join(directory, SUBDIR))
    for pattern in HF_WEIGHTS:
        for stale in glob.glob(os.path.join(glob.escape(directory), pattern)):
            os.remove(stale)
    config = copy.deepcopy(model.config)
    config.architectures = [type(model).__name__]
    setattr(config, CONFIG_KEY, {"checkpoint": SUBDIR, "version": __version__,
                                 "load_with": "sparse_prune.from_pretrained(folder)"})
    config.save_pretrained(directory)


def from_pretrained(directory: str | os.PathLike, model_class: type | None = None) -> nn.Module:
    """Rebuild a model written by :func:`save_pretrained` (a converted model's
    ``save_pretrained``): the dense skeleton from ``config.json`` (``model_class``, default the
    ``transformers`` class named in its ``architectures``; random init, no download), then
    ``sp.load`` of ``sparse_prune/`` onto it (formats, shrunk groups, fused GELUs). Returned in
    eval mode, with the same ``save_pretrained``.

    Errors: ``FileNotFoundError`` (no config.json), ``ValueError`` (a folder transformers wrote
    itself: load it with transformers' ``from_pretrained``; or an unknown architecture), and
    ``sp.load``'s own.
    """
    import transformers

    from sparse_prune.checkpoint import load

    directory = os.fspath(directory)
    if not os.path.isfile(os.path.join(directory, "config.json")):
        raise FileNotFoundError(f"{os.path.join(directory, 'config.json')} not found: not a save_pretrained folder")
    config = transformers.AutoConfig.from_pretrained(directory)
    entry = getattr(config, CONFIG_KEY, None)
    if not isinstance(entry, dict):
        raise ValueError(f"{directory} was not written by a converted model's save_pretrained (config.json has no "
                         f"{CONFIG_KEY!r} entry): load it with transformers' from_pretrained")
    if model_class is None:
        names = getattr(config, "architectures", None) or []
        model_class = getattr(transformers, names[0], None) if names else None
        if model_class is None:
            raise ValueError(f"{directory}: config.json names no transformers architecture ({names!r}); "
                             "pass model_class=")
    delattr(config, CONFIG_KEY)
    skeleton = model_class(config).eval()
    model = load(skeleton, os.path.join(directory, entry.get("checkpoint", SUBDIR)))
    return guard(model)
