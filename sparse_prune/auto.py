"""``convert(..., format="auto")``: per layer, the fastest of the formats that fit, dense included.

Each masked Linear's input is recorded on ``example_inputs`` (one forward of the masked dense
model); every candidate (format × backend) that can take the layer's mask is built, checked
against the masked dense layer, and timed against it on that input with the benchmark
harness (interleaved medians). A layer where no sparse candidate beats dense stays a masked
``nn.Linear``. Decisions are cached by (device, dtype, rows, shape, density, fitting
candidates) in an optional JSON file so a second conversion skips the timing.
"""

from __future__ import annotations

import copy
import json
import os
from typing import Any

import torch
from torch import nn

from sparse_prune import formats as F
from sparse_prune.masks import MaskSet
from sparse_prune.timing import time_interleaved

AUTO_ATTR = "sparse_prune_auto"  # the decision, kept on the chosen module for report()
SPARSE_FORMATS = ("2:4", "csr", "bsr", "shrink")
BSR_BLOCKS = ((32, 32), (16, 16))


def _record_inputs(model: nn.Module, masks: MaskSet, example_inputs: Any) -> dict[str, torch.Tensor]:
    masked = masks.apply(copy.deepcopy(model))
    wanted = {name.rpartition(".")[0] for name in masks if name.endswith(".weight")}
    seen: dict[str, torch.Tensor] = {}
    def keep(name: str):
        def hook(mod: nn.Module, args: tuple, out: Any) -> None:  # must return None: not replace out
            seen.setdefault(name, args[0].detach().reshape(-1, args[0].shape[-1]))
        return hook

    hooks = [module.register_forward_hook(keep(name)) for name, module in masked.named_modules()
             if name in wanted and type(module) is nn.Linear]
    try:
        with torch.inference_mode():
            inputs = example_inputs if isinstance(example_inputs, tuple) else (example_inputs,)
            masked(*inputs)
    finally:
        for h in hooks:
            h.remove()
    return seen


def _candidates(weight: torch.Tensor, mask: torch.Tensor, backends: list[str]) -> list[tuple[str, str, Any, dict]]:
    from sparse_prune.nn import resolve_backend

    out = []
    for fmt_name in SPARSE_FORMATS:
        variants = [{"block": b} for b in BSR_BLOCKS] if fmt_name == "bsr" else [{}]
        for kw in variants:
            try:
                fmt = F.FORMATS[fmt_name].from_dense(weight, mask, **kw)
            except ValueError:
                continue  # this mask does not fit the format
            for backend in backends:
                try:
                    resolve_backend(backend, fmt_name, fmt)
                except ValueError:
                    continue
                out.append((fmt_name, backend, fmt, kw))
    return out


def _load_cache(path: str | os.PathLike | None) -> dict[str, Any]:
    if path is None or not os.path.isfile(path):
        return {}
    try:
        with open(path) as fh:
            data = json.load(fh)
    except (OSError, json.JSONDecodeError):
        return {}  # a broken cache only costs a re-measurement
    return data if isinstance(data, dict) else {}


def choose(model: nn.Module, masks: MaskSet, example_inputs: Any, backends: list[str] | None = None,
           cache: str | os.PathLike | None = None, reps: int = 7) -> dict[str, dict[str, Any]]:
    """Per masked Linear weight name: ``{"format", "backend", "kw", "ratio", "ms"}`` of the
    fastest choice (``format`` is ``"dense"`` where dense wins; ``ratio`` = dense ms / chosen ms)."""
    from sparse_prune.kernels import triton_common
    from sparse_prune.nn import SparseLinear

    if example_inputs is None:
        raise ValueError("format='auto' needs example_inputs (a batch like the ones you will run)")
    params = dict(model.named_parameters())
    device = next(iter(params.values())).device
    if backends is None:
        backends = ["torch"] + (["triton"] if device.type == "cuda" and triton_common.available() else [])
    inputs = _record_inputs(model, masks, example_inputs)
    store = _load_cache(cache)
    decisions: dict[str, dict[str, Any]] = {}
    for name, mask in masks.items():
        layer_name = name.rpartition(".")[0]
        if layer_name not in inputs:
            continue
        module = model.get_submodule(layer_name)
        weight, x = params[name].detach(), inputs[layer_name]
        mask = mask.to(weight.device)
        cands = _candidates(weight, mask, backends)
        key = "|".join([str(device), str(weight.dtype), str(x.shape[0]), "x".join(map(str, weight.shape)),
                        f"{float(mask.float().mean()):.2f}", ",".join(sorted({f"{c[0]}/{c[1]}" for c in cands}))])
        if key in store:
            decisions[name] = store[key]
            continue
        dense = nn.Linear(weight.shape[1], weight.shape[0], bias=module.bias is not None).to(weight)
        with torch.no_grad():
            dense.weight.copy_(weight * mask)
            if module.bias is not None:
                dense.bias.copy_(module.bias)
        fns = {"dense": lambda d=dense, x=x: d(x)}
        meta = {"dense": ("dense", "torch", {})}
        with torch.inference_mode():
            want = dense(x)
        for fmt_name, backend, fmt, kw in cands:
            layer = SparseLinear(fmt, module.bias, backend)
            with torch.inference_mode():
                got = layer(x)
            if not torch.allclose(got.float(), want.float(), rtol=1e-2, atol=1e-2 * max(1.0, want.abs().max().item())):
                continue  # never pick a candidate that disagrees with the masked layer
            label = f"{fmt_name}/{backend}" + (f"/{kw['block'][0]}x{kw['block'][1]}" if kw else "")
            fns[label] = lambda layer=layer, x=x: layer(x)
            meta[label] = (fmt_name, backend, kw)
        ms = time_interleaved(fns, device, warmup=2, reps=reps)
        best = min(ms, key=ms.get)
        fmt_name, backend, kw = meta[best]
        decisions[name] = {"format": fmt_name, "backend": backend, "kw": {k: list(v) for k, v in kw.items()},
                           "ratio": ms["dense"] / ms[best], "ms": ms}
        store[key] = decisions[name]
    if cache is not None:
        os.makedirs(os.path.dirname(os.path.abspath(cache)), exist_ok=True)
        with open(cache, "w") as fh:
            json.dump(store, fh, indent=1)
    return decisions
