"""Attention on our CPU kernel for transformers models.

``sp.set_attention(model, "sparse_prune")`` makes every attention layer of a transformers model
(``ViTForImageClassification`` and any other built on transformers' ``AttentionInterface``)
call ``sparse_prune::attention``: softmax(scale · Q·Kᵀ)·V in one pass per head on the CPU
(csrc/cpu/attention_kernel.h: AVX-512 or AVX2+FMA, float32), torch's SDPA elsewhere (other
dtypes, devices and CPUs).
What that kernel does not take — an attention mask, dropout, gradients, ``output_attentions``,
grouped or broadcast heads, causal attention (a module without ``is_causal`` counts as causal,
as transformers has it), a softcap or a position bias — goes to transformers' own ``"sdpa"`` for
that call, so the model computes what it computes with ``"sdpa"``.

After pruning, the Linears shrink and attention becomes a quarter of a ViT-B/16 forward at 90%
sparsity; measure dense and sparse models with the same attention implementation (the
benchmarks do), so a speedup is never attention's alone.
"""

from __future__ import annotations

import torch
from torch import nn

import sparse_prune.ops  # noqa: F401  (defines sparse_prune::attention)

NAME = "sparse_prune"
IMPLEMENTATIONS = (NAME, "sdpa", "eager")


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None) -> torch.Tensor:
    """``softmax(scale · q·kᵀ)·v`` (``scale`` None: 1/√head_dim) for q [B, H, Lq, D],
    k [B, H, Lk, D], v [B, H, Lk, Dv]: [B, H, Lq, Dv], laid out as [B, Lq, H, Dv] in memory.

    No mask, no dropout; gradients are recomputed through torch's SDPA. Raises ``ValueError``
    (dims, shapes, a scale not finite in float32) or ``TypeError`` (dtypes) naming the argument."""
    return torch.ops.sparse_prune.attention(q, k, v, scale)


def _needs_sdpa(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                attention_mask: torch.Tensor | None, dropout: float, kwargs: dict) -> bool:
    """What transformers' sdpa_attention_forward would do differently from our kernel."""
    if attention_mask is not None or dropout:  # sdpa applies any dropout it is passed, training or not
        return True
    if torch.is_grad_enabled() and (query.requires_grad or key.requires_grad or value.requires_grad):
        return True  # the op's backward recomputes through SDPA: SDPA's own forward is cheaper then
    if getattr(module, "num_key_value_groups", 1) != 1 or not (query.shape[:2] == key.shape[:2] == value.shape[:2]):
        return True  # grouped or broadcast heads / batch
    causal = kwargs.get("is_causal")
    if causal if causal is not None else getattr(module, "is_causal", True):  # transformers' default
        return True
    return any(kwargs.get(name) for name in ("output_attentions", "softcap")) or kwargs.get("position_bias") is not None


def transformers_attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                           attention_mask: torch.Tensor | None, scaling: float | None = None, dropout: float = 0.0,
                           **kwargs) -> tuple[torch.Tensor, None]:
    """transformers' attention-function signature: ``(attn_output [B, L, H, Dv], None)``."""
    if _needs_sdpa(module, query, key, value, attention_mask, dropout, kwargs):
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    return torch.ops.sparse_prune.attention(query, key, value, scaling).transpose(1, 2), None


def _register() -> None:
    from transformers import AttentionInterface

    AttentionInterface.register(NAME, transformers_attention)


def set_attention(model: nn.Module, implementation: str = NAME) -> nn.Module:
    """Set the attention of a transformers model to ``"sparse_prune"`` (our kernel), ``"sdpa"``
    or ``"eager"`` (transformers' own), in place; returns ``model``.

    Raises ``ValueError`` for another name and ``TypeError`` for a model that is not a
    transformers ``PreTrainedModel`` (a timm ViT keeps torch's SDPA)."""
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(f"implementation must be one of {IMPLEMENTATIONS}, got {implementation!r}")
    if not (hasattr(model, "set_attn_implementation") and hasattr(model, "config")):
        raise TypeError(f"set_attention takes a transformers PreTrainedModel, got {type(model).__name__}")
    if implementation == NAME:
        _register()
    model.set_attn_implementation(implementation)
    return model


def attention_implementation(model: nn.Module) -> str:
    """The attention implementation a model's forward runs: a transformers model's
    ``config._attn_implementation``, ``"sdpa"`` for any other module (torch's)."""
    config = getattr(model, "config", None)
    return str(getattr(config, "_attn_implementation", None) or "sdpa")
