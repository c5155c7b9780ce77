"""MaskSet: pruning masks as data (parameter name -> torch.bool mask of the parameter's shape)."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Mapping
from typing import Any

import torch
from torch import nn
from torch.nn.utils import prune as torch_prune

_META_KEY = "sparse_prune"


def _split(name: str) -> tuple[str, str]:
    module, _, param = name.rpartition(".")
    return module, param


class MaskSet(Mapping):
    """An immutable mapping from parameter names to ``torch.bool`` keep-masks.

    ``True`` keeps a weight, ``False`` prunes it. ``info`` is a free-form dict (method,
    amount, ...) saved with the masks.
    """

    def __init__(self, masks: Mapping[str, torch.Tensor] | None = None, info: dict | None = None):
        self._masks: dict[str, torch.Tensor] = {}
        for name, mask in (masks or {}).items():
            if not isinstance(name, str):
                raise TypeError(f"mask names must be str, got {type(name).__name__}")
            if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
                raise TypeError(f"mask {name!r} must be a torch.bool tensor")
            self._masks[name] = mask
        self.info: dict[str, Any] = dict(info or {})

    # Mapping protocol -------------------------------------------------------------------
    def __getitem__(self, name: str) -> torch.Tensor:
        return self._masks[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._masks)

    def __len__(self) -> int:
        return len(self._masks)

    def __repr__(self) -> str:
        return f"MaskSet({len(self)} masks, sparsity={self.sparsity():.4f})"

    # Statistics ---------------------------------------------------------------------------
    def sparsity(self) -> float:
        """Fraction of pruned weights over all masked weights (0.0 for an empty set)."""
        total = sum(m.numel() for m in self._masks.values())
        if total == 0:
            return 0.0
        kept = sum(int(m.sum()) for m in self._masks.values())
        return 1.0 - kept / total

    def layer_sparsity(self) -> dict[str, float]:
        """``{parameter name: fraction pruned}``."""
        return {
            name: (1.0 - float(m.sum()) / m.numel()) if m.numel() else 0.0
            for name, m in self._masks.items()
        }

    def summary(self) -> str:
        """A plain-text table: parameter, shape, kept, total, sparsity; then the total."""
        rows = [(n, "x".join(map(str, m.shape)), int(m.sum()), m.numel()) for n, m in self._masks.items()]
        width = max([len("parameter")] + [len(r[0]) for r in rows])
        lines = [f"{'parameter':<{width}}  {'shape':>12}  {'kept':>10}  {'total':>10}  sparsity"]
        for name, shape, kept, total in rows:
            sp = 1 - kept / total if total else 0.0
            lines.append(f"{name:<{width}}  {shape:>12}  {kept:>10}  {total:>10}  {sp:8.4f}")
        lines.append(f"{'total':<{width}}  {'':>12}  {sum(r[2] for r in rows):>10}  "
                     f"{sum(r[3] for r in rows):>10}  {self.sparsity():8.4f}")
        return "\n".join(lines)

    # Combination --------------------------------------------------------------------------
    def __and__(self, other: MaskSet) -> MaskSet:
        """Stack two rounds: a weight is kept only if both keep it (old zeros stay zero).

        Names present in one set only keep that set's mask.
        """
        if not isinstance(other, MaskSet):
            return NotImplemented
        merged = dict(self._masks)
        for name, mask in other.items():
            if name in merged:
                if merged[name].shape != mask.shape:
                    raise ValueError(
                        f"mask {name!r}: shapes {tuple(merged[name].shape)} and {tuple(mask.shape)} differ"
                    )
                merged[name] = merged[name] & mask.to(merged[name].device)
            else:
                merged[name] = mask
        return MaskSet(merged, info={"stacked": [self.info, other.info]})

    def to(self, device: torch.device | str) -> MaskSet:
        return MaskSet({n: m.to(device) for n, m in self._masks.items()}, self.info)

    # Model interaction --------------------------------------------------------------------
    def validate(self, model: nn.Module) -> None:
        """Raise ``ValueError`` unless every mask names a parameter of ``model`` with its shape."""
        params = dict(model.named_parameters())
        orig = {n[: -len("_orig")]: p for n, p in params.items() if n.endswith("_orig")}
        for name, mask in self._masks.items():
            param = params.get(name, orig.get(name))
            if param is None:
                raise ValueError(f"mask {name!r} names no parameter of the model")
            if param.shape != mask.shape:
                raise ValueError(
                    f"mask {name!r} has shape {tuple(mask.shape)}, the parameter has {tuple(param.shape)}"
                )

    @torch.no_grad()
    def apply(self, model: nn.Module) -> nn.Module:
        """Zero the pruned weights of ``model`` in place (simulated sparsity); returns ``model``.

        All masks are checked first, so nothing is modified when one does not fit.
        """
        self.validate(model)
        params = dict(model.named_parameters())
        for name, mask in self._masks.items():
            if name in params:
                param = params[name]
            else:  # attached with torch.nn.utils.prune: zero the original too
                param = params[name + "_orig"]
            param.mul_(mask.to(param.device, param.dtype))
        return model

    def attach(self, model: nn.Module) -> nn.Module:
        """Attach the masks as ``torch.nn.utils.prune`` would (``weight_orig`` + ``weight_mask``).

        ``torch.nn.utils.prune.remove(module, "weight")`` then makes them permanent. A
        parameter that already carries a torch-prune mask gets the two masks combined, as
        torch's ``PruningContainer`` does.
        """
        self.validate(model)
        modules = dict(model.named_modules())
        for name, mask in self._masks.items():
            module_name, param_name = _split(name)
            module = modules[module_name]
            ref = getattr(module, param_name)
            torch_prune.custom_from_mask(module, param_name, mask.to(ref.device))
        return model

    @classmethod
    def from_model(cls, model: nn.Module) -> MaskSet:
        """Read back masks attached by ``torch.nn.utils.prune`` or by :meth:`attach`."""
        masks = {}
        for module_name, module in model.named_modules():
            for hook in module._forward_pre_hooks.values():
                if isinstance(hook, torch_prune.BasePruningMethod):
                    tensor_name = hook._tensor_name
                    mask = getattr(module, tensor_name + "_mask")
                    key = f"{module_name}.{tensor_name}" if module_name else tensor_name
                    masks[key] = mask.detach().bool().clone()
        return cls(masks, info={"source": "torch.nn.utils.prune"})

    # Files --------------------------------------------------------------------------------
    def save(self, path: str | os.PathLike) -> None:
        """Write the masks (and ``info`` as JSON metadata) to a safetensors file."""
        from safetensors.torch import save_file

        tensors = {n: m.detach().cpu().contiguous() for n, m in self._masks.items()}
        save_file(tensors, os.fspath(path), metadata={_META_KEY: json.dumps(self.info, default=str)})

    @classmethod
    def load(cls, path: str | os.PathLike, device: torch.device | str = "cpu") -> MaskSet:
        """Read a file written by :meth:`save`; non-bool tensors are a ``ValueError``."""
        from safetensors import safe_open

        masks = {}
        with safe_open(os.fspath(path), framework="pt", device=str(device)) as f:
            meta = f.metadata() or {}
            for name in f.keys():
                tensor = f.get_tensor(name)
                if tensor.dtype != torch.bool:
                    raise ValueError(f"{path}: tensor {name!r} is {tensor.dtype}, masks must be torch.bool")
                masks[name] = tensor
        info = json.loads(meta[_META_KEY]) if _META_KEY in meta else {}
        return cls(masks, info)
