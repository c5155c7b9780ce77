"""MaskSet: pruning masks as data (parameter name -> torch.bool mask of the parameter's shape)."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator, Mapping
from types import MappingProxyType
from typing import Any

import torch
from torch import nn
from torch.nn.utils import prune as torch_prune

_META_KEY = "sparse_prune"
_WEIGHTS_KEY = "sparse_prune_weights"  # metadata: JSON {file key: parameter name} of the weights
_ORDER_KEY = "sparse_prune_order"  # metadata: JSON list of the mask names in the set's order
_WEIGHT_PREFIX = "weight:"  # file key of a reconstructed weight (":" never occurs in a mask name)


def fingerprint(model: nn.Module) -> dict[str, Any]:
    """``{"params": count, "sha256": digest}`` of the model's parameter names and shapes (names
    of ``torch.nn.utils.prune``'d parameters without their ``_orig``): what masks were computed
    on, recorded by ``sp.prune``/:meth:`MaskSet.from_model` in ``info["fingerprint"]`` and
    checked by :meth:`MaskSet.validate`. Values, dtype and device do not count."""
    entries = sorted(f"{n.removesuffix('_orig')}:{'x'.join(map(str, p.shape))}" for n, p in model.named_parameters())
    digest = hashlib.sha256("\n".join(entries).encode()).hexdigest()[:16]
    return {"params": len(entries), "sha256": digest}


def _split(name: str) -> tuple[str, str]:
    module, _, param = name.rpartition(".")
    return module, param


class MaskSet(Mapping):
    """An immutable mapping from parameter names to ``torch.bool`` keep-masks.

    ``True`` keeps a weight, ``False`` prunes it. ``info`` is a free-form dict (method,
    amount, ...) saved with the masks.

    ``weights`` (read-only mapping, empty for mask-only methods) holds the values a method
    that reconstructs the kept weights (``sparsegpt``) computed for some masked parameters:
    floating tensors of the mask's shape, zero where pruned. :meth:`apply`, :meth:`attach`,
    ``sp.convert`` and :meth:`save`/:meth:`load` use them; ``&`` keeps them (see there).
    """

    def __init__(self, masks: Mapping[str, torch.Tensor] | None = None, info: dict | None = None,
                 weights: Mapping[str, torch.Tensor] | None = None):
        self._masks: dict[str, torch.Tensor] = {}
        for name, mask in (masks or {}).items():
            if not isinstance(name, str):
                raise TypeError(f"mask names must be str, got {type(name).__name__}")
            if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
                raise TypeError(f"mask {name!r} must be a torch.bool tensor")
            self._masks[name] = mask
        self._weights: dict[str, torch.Tensor] = {}
        for name, weight in (weights or {}).items():
            if name not in self._masks:
                raise ValueError(f"weights[{name!r}] has no mask of that name")
            if not isinstance(weight, torch.Tensor) or not weight.is_floating_point():
                raise TypeError(f"weights[{name!r}] must be a floating torch tensor")
            if weight.shape != self._masks[name].shape:
                raise ValueError(f"weights[{name!r}] has shape {tuple(weight.shape)}, its mask "
                                 f"{tuple(self._masks[name].shape)}")
            self._weights[name] = weight
        self.info: dict[str, Any] = dict(info or {})

    @property
    def weights(self) -> Mapping[str, torch.Tensor]:
        """Reconstructed weights by parameter name (read-only; empty for mask-only methods)."""
        return MappingProxyType(self._weights)

    def without_weights(self) -> MaskSet:
        """The same masks with no reconstructed weights (``apply`` then only zeroes)."""
        return MaskSet(self._masks, self.info)

    # Mapping protocol -------------------------------------------------------------------
    def __getitem__(self, name: str) -> torch.Tensor:
        return self._masks[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._masks)

    def __len__(self) -> int:
        return len(self._masks)

    def __repr__(self) -> str:
        extra = f", {len(self._weights)} reconstructed weights" if self._weights else ""
        return f"MaskSet({len(self)} masks, sparsity={self.sparsity():.4f}{extra})"

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

        Names present in one set only keep that set's mask. Reconstructed weights: the right
        operand's (the later round, computed on the model the earlier round produced) where it
        has them, else the left's; either way :meth:`apply` zeroes them under the combined mask.
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
        weights = {**self._weights, **other._weights}
        info: dict[str, Any] = {"stacked": [self.info, other.info]}
        if self.info.get("fingerprint") == other.info.get("fingerprint") and "fingerprint" in self.info:
            info["fingerprint"] = self.info["fingerprint"]  # both rounds on the same model
        return MaskSet(merged, info=info, weights=weights)

    def to(self, device: torch.device | str) -> MaskSet:
        return MaskSet({n: m.to(device) for n, m in self._masks.items()}, self.info,
                       {n: w.to(device) for n, w in self._weights.items()})

    # Model interaction --------------------------------------------------------------------
    def validate(self, model: nn.Module) -> None:
        """Raise ``ValueError`` unless every mask names a parameter of ``model`` with its shape,
        and, when ``info`` holds the :func:`fingerprint` of the model the masks were computed on
        (every set from ``sp.prune`` or :meth:`from_model`; files saved before it have none and
        are not checked), unless ``model`` has that fingerprint: masks of a 2-block model do not
        silently convert a 12-block one. ``del masks.info["fingerprint"]`` skips that check.

        A tied parameter (one tensor under several names) may be named by any of its names,
        but by one mask only: two masks for one tensor cannot both hold."""
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
        expected = self.info.get("fingerprint")
        if isinstance(expected, dict) and "sha256" in expected:
            found = fingerprint(model)
            if found["sha256"] != expected["sha256"]:
                raise ValueError(
                    f"these masks were computed on another model: {expected.get('params')} parameters "
                    f"(fingerprint {expected['sha256']}), this one has {found['params']} ({found['sha256']}; "
                    "names and shapes differ). Prune this model, or del masks.info['fingerprint'] to "
                    "apply them anyway")
        params = dict(model.named_parameters(remove_duplicate=False))
        orig = {n[: -len("_orig")]: p for n, p in params.items() if n.endswith("_orig")}
        owner: dict[int, str] = {}
        for name, mask in self._masks.items():
            param = params.get(name, orig.get(name))
            if param is None:
                raise ValueError(f"mask {name!r} names no parameter of the model")
            if param.shape != mask.shape:
                raise ValueError(
                    f"mask {name!r} has shape {tuple(mask.shape)}, the parameter has {tuple(param.shape)}"
                )
            if id(param) in owner:
                raise ValueError(f"masks {owner[id(param)]!r} and {name!r} name one tied parameter (the same "
                                 "tensor): keep one of them")
            owner[id(param)] = name

    @torch.no_grad()
    def apply(self, model: nn.Module) -> nn.Module:
        """Zero the pruned weights of ``model`` in place (simulated sparsity); returns ``model``.

        Parameters with reconstructed ``weights`` get those values written (cast to the
        parameter's dtype and device), masked: the model then computes what the pruning
        method intended. All masks are checked first, so nothing is modified when one does
        not fit.
        """
        self.validate(model)
        params = dict(model.named_parameters(remove_duplicate=False))
        for name, mask in self._masks.items():
            if name in params:
                param = params[name]
            else:  # attached with torch.nn.utils.prune: zero the original too
                param = params[name + "_orig"]
            if name in self._weights:
                param.copy_(self._weights[name].to(param.device, param.dtype))
            param.mul_(mask.to(param.device, param.dtype))
        return model

    def attach(self, model: nn.Module) -> nn.Module:
        """Attach the masks as ``torch.nn.utils.prune`` would (``weight_orig`` + ``weight_mask``).

        ``torch.nn.utils.prune.remove(module, "weight")`` then makes them permanent. A
        parameter that already carries a torch-prune mask gets the two masks combined, as
        torch's ``PruningContainer`` does. Reconstructed ``weights`` are written into the
        parameter first (so ``weight_orig`` holds them and ``weight`` = them × mask): unlike a
        mask-only set, attaching one changes the model's values.
        """
        self.validate(model)
        modules = dict(model.named_modules())
        params = dict(model.named_parameters(remove_duplicate=False))
        with torch.no_grad():
            for name, weight in self._weights.items():
                param = params[name] if name in params else params[name + "_orig"]
                param.copy_(weight.to(param.device, param.dtype))
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
        return cls(masks, info={"source": "torch.nn.utils.prune", "fingerprint": fingerprint(model)})

    # Files --------------------------------------------------------------------------------
    def save(self, path: str | os.PathLike) -> None:
        """Write the masks (``info`` as JSON metadata, reconstructed weights under
        ``"weight:<name>"`` keys listed in the metadata) to a safetensors file."""
        from safetensors.torch import save_file

        from sparse_prune import atomic

        tensors = {n: m.detach().cpu().contiguous() for n, m in self._masks.items()}
        keys = {_WEIGHT_PREFIX + n: n for n in self._weights}
        tensors.update({k: self._weights[n].detach().cpu().contiguous() for k, n in keys.items()})
        meta = {_META_KEY: json.dumps(self.info, default=str), _ORDER_KEY: json.dumps(list(self._masks))}
        if keys:
            meta[_WEIGHTS_KEY] = json.dumps(keys)
        # crash-safe: a temporary file, fsynced, renamed over `path` (sparse_prune.atomic)
        atomic.write_atomic(path, lambda tmp: save_file(tensors, tmp, metadata=meta))

    @classmethod
    def load(cls, path: str | os.PathLike, device: torch.device | str = "cpu") -> MaskSet:
        """Read a file written by :meth:`save` (weights included). Every bad file is a
        ``ValueError`` naming it: empty, truncated, corrupted or not safetensors, broken
        metadata, a non-bool mask, a weight that is not floating or does not match its mask
        (``FileNotFoundError`` when it does not exist)."""
        from sparse_prune import files

        tensors, meta = files.read_safetensors(path, device, "mask file")
        keys = files.json_field(meta, _WEIGHTS_KEY, path, dict) if _WEIGHTS_KEY in meta else {}
        if not all(isinstance(k, str) and isinstance(v, str) for k, v in keys.items()):
            raise files.bad_file(path, f"metadata {_WEIGHTS_KEY!r} must map file keys to parameter names (str)")
        missing = [k for k in keys if k not in tensors]
        if missing:
            raise files.bad_file(path, f"metadata lists weight {missing[0]!r}, which the file does not hold")
        masks, weights = {}, {}
        for name, tensor in tensors.items():
            if name in keys:
                if not tensor.is_floating_point():
                    raise files.bad_file(path, f"weight {keys[name]!r} is {tensor.dtype}, must be floating")
                weights[keys[name]] = tensor
            elif tensor.dtype != torch.bool:
                raise files.bad_file(path, f"tensor {name!r} is {tensor.dtype}, masks must be torch.bool")
            else:
                masks[name] = tensor
        info = files.json_field(meta, _META_KEY, path, dict) if _META_KEY in meta else {}
        order = files.json_field(meta, _ORDER_KEY, path, list) if _ORDER_KEY in meta else []
        if sorted(map(str, order)) == sorted(masks):  # the saved order (safetensors sorts its keys)
            masks = {name: masks[name] for name in order}
        try:
            return cls(masks, info, weights)
        except (TypeError, ValueError) as exc:
            raise files.bad_file(path, str(exc)) from None
