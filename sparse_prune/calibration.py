"""Calibration helpers shared by :mod:`sparse_prune.pruning` (``wanda``, the ``block`` method's
Wanda score) and :mod:`sparse_prune.sparsegpt`: moving and feeding calibration batches, the
``nn.MultiheadAttention`` out_proj hook, and Wanda's input norms.

A module of its own so that ``pruning`` imports ``sparsegpt`` and both import this one: no
import circle (``pruning`` used to import ``sparsegpt`` and ``sparsegpt`` ``pruning``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm


def move_batch(batch: Any, device: torch.device) -> Any:
    if isinstance(batch, torch.Tensor):
        return batch.to(device)
    if isinstance(batch, Mapping):
        return {k: move_batch(v, device) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(move_batch(v, device) for v in batch)
    return batch


def call_model(model: nn.Module, batch: Any) -> Any:
    if isinstance(batch, Mapping):
        return model(**batch)
    if isinstance(batch, (list, tuple)):
        return model(*batch)
    return model(batch)


def check_calibration(calibration: Any, method: str) -> Iterable[Any]:
    """``calibration`` must be an iterable of batches (a list, a DataLoader, a generator), not
    one batch: a bare tensor would be iterated image by image. ``TypeError`` otherwise."""
    if isinstance(calibration, torch.Tensor):
        raise TypeError(f"calibration for {method!r} must be an iterable of model inputs (e.g. a list of "
                        f"batches), got one Tensor of shape {tuple(calibration.shape)}: wrap it, calibration=[x]")
    if isinstance(calibration, (str, bytes, Mapping)) or not isinstance(calibration, Iterable):
        raise TypeError(f"calibration for {method!r} must be an iterable of model inputs (tensors, tuples or "
                        f"dicts), got {type(calibration).__name__}")
    return calibration


def run_batch(model: nn.Module, batch: Any, index: int, what: str = "calibration") -> Any:
    """``call_model`` on one checked batch; a batch the model cannot run (wrong shape, dtype or
    type: torch's raw ``RuntimeError``/``TypeError``/``IndexError``) is a ``ValueError`` naming
    ``what`` and the batch. Errors of the library's own hooks pass through unchanged."""
    if not isinstance(batch, (torch.Tensor, Mapping, list, tuple)):
        raise TypeError(f"{what} batch {index} must be a tensor, a tuple/list of tensors or a dict of "
                        f"model inputs, got {type(batch).__name__}")
    try:
        return call_model(model, batch)
    except (RuntimeError, TypeError, IndexError) as exc:
        raise ValueError(f"{what} batch {index} does not fit the model ({_describe(batch)}): "
                         f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}") from exc


def _describe(batch: Any) -> str:
    if isinstance(batch, torch.Tensor):
        return f"a {batch.dtype} tensor of shape {tuple(batch.shape)}"
    if isinstance(batch, Mapping):
        return "a dict of " + ", ".join(f"{k}: {_describe(v)}" for k, v in batch.items())
    if isinstance(batch, (list, tuple)):
        return f"a {type(batch).__name__} of " + ", ".join(_describe(v) for v in batch)
    return type(batch).__name__


def check_finite_sum(total: torch.Tensor, tokens: int, layer: str, method: str) -> None:
    """Calibration statistics of ``layer`` need tokens and finite inputs: ``ValueError`` for 0
    tokens (empty batches) or a NaN/inf in the accumulated sums — scores from those are garbage."""
    if tokens == 0:
        raise ValueError(f"calibration gave 0 tokens to {layer} (empty batches): {method} needs at least one input")
    if not bool(torch.isfinite(total).all()):
        raise ValueError(f"calibration inputs of {layer} contain NaN or inf (a non-finite calibration batch, "
                         f"or activations that overflowed): {method} scores would be garbage; give finite inputs")


@torch.no_grad()
def input_norms(model: nn.Module, targets: Sequence[Any], calibration: Iterable[Any],
                progress: bool = False) -> dict[str, torch.Tensor]:
    """‖X_j‖₂ over all calibration tokens for every input column j of each target ([K], fp32).

    Statistics are gathered with forward hooks (no copy of the model). Conv2d inputs are
    reduced per input channel and repeated over the kernel window (im2col column order).
    """
    sums: dict[str, torch.Tensor] = {}
    tokens: dict[str, int] = {}

    def hook_for(t: Any) -> Callable:
        def hook(module: nn.Module, inputs: tuple, output: Any) -> None:
            x = inputs[0].detach().float()
            if isinstance(module, nn.Conv2d):
                if module.groups != 1:
                    raise ValueError(f"wanda supports ungrouped Conv2d only; {t.module_name} has groups={module.groups}")
                sq = x.pow(2).sum(dim=(0, 2, 3)).repeat_interleave(module.kernel_size[0] * module.kernel_size[1])
            else:
                sq = x.reshape(-1, x.shape[-1]).pow(2).sum(0)
            sums[t.param] = sums[t.param] + sq if t.param in sums else sq
            tokens[t.param] = tokens.get(t.param, 0) + (x.numel() // x.shape[1 if isinstance(module, nn.Conv2d) else -1]
                                                        if x.numel() else 0)
        return hook

    owners = {id(m.out_proj): m for m in model.modules() if isinstance(m, nn.MultiheadAttention)}
    handles = []
    for t in targets:
        if id(t.module) in owners:
            # nn.MultiheadAttention reads out_proj.weight without calling out_proj, so its
            # input is recomputed from the attention module's own call.
            handles.append(owners[id(t.module)].register_forward_hook(
                mha_out_proj_hook(hook_for(t)), with_kwargs=True))
        else:
            handles.append(t.module.register_forward_hook(hook_for(t)))
    was_training = model.training
    device = next(model.parameters()).device
    batches = 0
    try:
        model.eval()
        for batch in tqdm(check_calibration(calibration, "wanda"), desc="wanda calibration",
                          disable=not progress, leave=False):
            run_batch(model, move_batch(batch, device), batches)
            batches += 1
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    if batches == 0:
        raise ValueError("calibration is empty: give an iterable of model inputs (tensors, tuples or dicts)")
    missing = [t.param for t in targets if t.param not in sums]
    if missing:
        raise ValueError(f"calibration inputs never reached {len(missing)} layer(s), e.g. {missing[0]}")
    for name, total in sums.items():
        check_finite_sum(total, tokens[name], name, "wanda")
    return {name: s.sqrt() for name, s in sums.items()}


def mha_out_proj_hook(inner: Callable) -> Callable:
    """Forward hook for ``nn.MultiheadAttention`` passing the out_proj input to ``inner``."""

    def hook(mha: nn.MultiheadAttention, args: tuple, kwargs: dict, output: Any) -> None:
        names = ("query", "key", "value")
        q, k, v = (args[i] if len(args) > i else kwargs[n] for i, n in enumerate(names))
        if mha.batch_first:
            q, k, v = (x.transpose(0, 1) for x in (q, k, v))
        e = mha.embed_dim
        eye = torch.eye(e, dtype=q.dtype, device=q.device)
        pre, _ = nn.functional.multi_head_attention_forward(
            q, k, v, e, mha.num_heads, mha.in_proj_weight, mha.in_proj_bias, mha.bias_k,
            mha.bias_v, mha.add_zero_attn, 0.0, eye, torch.zeros(e, dtype=q.dtype, device=q.device),
            training=False, key_padding_mask=kwargs.get("key_padding_mask"), need_weights=False,
            attn_mask=kwargs.get("attn_mask"), use_separate_proj_weight=not mha._qkv_same_embed_dim,
            q_proj_weight=mha.q_proj_weight, k_proj_weight=mha.k_proj_weight,
            v_proj_weight=mha.v_proj_weight, is_causal=kwargs.get("is_causal", False))
        inner(mha.out_proj, (pre,), None)

    return hook
