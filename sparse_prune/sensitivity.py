"""Per-layer sensitivity scan: prune one layer at a time, evaluate, restore."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from sparse_prune.pruning import prune


def sensitivity(
    model: nn.Module,
    method: str,
    amounts: Iterable[float | int],
    evaluate: Callable[[nn.Module], float],
    *,
    progress: bool = False,
    **prune_kwargs: Any,
) -> list[dict[str, Any]]:
    """Score ``model`` with each masked parameter pruned alone, for every amount.

    For each amount the masks are computed once (local scope: a layer's mask does not depend
    on the others), then each parameter is zeroed alone, ``evaluate(model)`` is called and
    the weights are restored exactly. ``prune_kwargs`` go to :func:`sparse_prune.prune`.

    Returns rows ``{"layer", "amount", "sparsity", "score"}``, the first being the dense model
    (``layer`` = ``None``, ``amount`` = 0) — JSON-serialisable.
    """
    if prune_kwargs.get("scope", "local") != "local":
        raise ValueError("sensitivity prunes one layer at a time: scope must be 'local'")
    amounts = list(amounts)
    if not amounts:
        raise ValueError("amounts is empty")
    rows: list[dict[str, Any]] = [
        {"layer": None, "amount": 0.0, "sparsity": 0.0, "score": float(evaluate(model))}
    ]
    params = dict(model.named_parameters())
    per_amount = [(a, prune(model, method, a, **prune_kwargs)) for a in amounts]
    total = sum(len(m) for _, m in per_amount)
    with tqdm(total=total, desc=f"sensitivity {method}", disable=not progress) as bar:
        for amount, masks in per_amount:
            for name, mask in masks.items():
                param = params[name]
                original = param.detach().clone()
                try:
                    with torch.no_grad():
                        param.mul_(mask.to(param.device, param.dtype))
                    score = float(evaluate(model))
                finally:
                    with torch.no_grad():
                        param.copy_(original)
                rows.append({"layer": name, "amount": amount,
                             "sparsity": masks.layer_sparsity()[name], "score": score})
                bar.update()
    return rows
