"""Dependency-aware shrinking: remove pruned MLP neurons and attention heads physically.

A unit of a :class:`~sparse_prune.structure.Group` (an MLP hidden neuron or an attention
head) contributes nothing to the block's output when its *consumer* slice is fully pruned:
the fc2 column of a neuron, the output-projection columns of a head. Such a unit is removed
from every member of the group — fc1 row and bias, q/k/v rows and biases, fc2/o_proj
columns — so the block runs smaller dense GEMMs with no gather or scatter, and the attention
module's head count is updated. The function computed is unchanged exactly (the removed
units were multiplied by zero).

Supported: transformers ViT 4.x/5.x, timm ``Attention``/``Mlp`` and torchvision
``VisionTransformer`` (whose ``nn.MultiheadAttention`` cannot hold fewer heads than
``embed_dim / head_dim``, so it is replaced by :class:`HeadPrunedAttention`).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from sparse_prune.structure import Group, find_groups, resolve_param

DENSE_SHAPE_ATTR = "sparse_prune_dense_shape"


@dataclass(frozen=True)
class ShrinkRecord:
    """What :func:`shrink_groups` did to one group: ``kept`` of ``units`` survive."""

    name: str
    kind: str
    units: int
    kept: int


class HeadPrunedAttention(nn.Module):
    """``nn.MultiheadAttention``'s self-attention forward with ``num_heads * head_dim != embed_dim``.

    Holds ``in_proj_weight [3·H·d, E]``, ``in_proj_bias [3·H·d]`` and ``out_proj`` (``H·d → E``)
    under the names ``nn.MultiheadAttention`` uses, so state dicts and mask names carry over.
    ``forward(query, key, value, key_padding_mask=None, need_weights=True, attn_mask=None,
    average_attn_weights=True, is_causal=False)`` returns ``(output, weights or None)``.
    """

    def __init__(self, embed_dim: int, num_heads: int, head_dim: int, bias: bool = True,
                 batch_first: bool = False, dropout: float = 0.0,
                 device: torch.device | None = None, dtype: torch.dtype | None = None):
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        self.embed_dim, self.num_heads, self.head_dim = embed_dim, num_heads, head_dim
        self.batch_first, self.dropout = batch_first, dropout
        inner = num_heads * head_dim
        self.in_proj_weight = nn.Parameter(torch.empty(3 * inner, embed_dim, **dd))
        self.in_proj_bias = nn.Parameter(torch.empty(3 * inner, **dd)) if bias else None
        self.out_proj = nn.Linear(inner, embed_dim, bias=bias, **dd)

    @classmethod
    def from_mha(cls, mha: nn.MultiheadAttention, num_heads: int) -> HeadPrunedAttention:
        w = mha.in_proj_weight
        return cls(mha.embed_dim, num_heads, mha.head_dim, bias=mha.in_proj_bias is not None,
                   batch_first=mha.batch_first, dropout=mha.dropout, device=w.device, dtype=w.dtype)

    def forward(self, query, key, value, key_padding_mask=None, need_weights=True, attn_mask=None,
                average_attn_weights=True, is_causal=False):
        if not self.batch_first:
            query, key, value = (t.transpose(0, 1) for t in (query, key, value))
        inner = self.num_heads * self.head_dim
        w, b = self.in_proj_weight, self.in_proj_bias
        bq, bk, bv = (None, None, None) if b is None else b.split(inner)
        wq, wk, wv = w.split(inner)

        def heads(x, weight, bias):  # [B, L, E] -> [B, H, L, d]
            return F.linear(x, weight, bias).unflatten(-1, (self.num_heads, self.head_dim)).transpose(1, 2)

        q, k, v = heads(query, wq, bq), heads(key, wk, bk), heads(value, wv, bv)
        mask = _merge_masks(attn_mask, key_padding_mask, q)
        dropout = self.dropout if self.training else 0.0
        if need_weights:
            scores = (q @ k.transpose(-2, -1)) * self.head_dim ** -0.5
            if is_causal and mask is None:
                mask = torch.ones(q.shape[-2], k.shape[-2], dtype=torch.bool, device=q.device).tril().logical_not()
                mask = torch.zeros_like(mask, dtype=q.dtype).masked_fill(mask, float("-inf"))
            weights = (scores + mask if mask is not None else scores).softmax(-1)
            out = F.dropout(weights, dropout, self.training) @ v
        else:
            weights = None
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout,
                                                 is_causal=is_causal and mask is None)
        out = self.out_proj(out.transpose(1, 2).flatten(-2))
        if not self.batch_first:
            out = out.transpose(0, 1)
        if weights is not None and average_attn_weights:
            weights = weights.mean(1)
        return out, weights


def _merge_masks(attn_mask, key_padding_mask, q):
    """Both of ``nn.MultiheadAttention``'s masks as one additive float mask (True = masked out)."""
    merged = None
    for m, shape in ((attn_mask, None), (key_padding_mask, "kpm")):
        if m is None:
            continue
        if m.dtype == torch.bool:
            m = torch.zeros(m.shape, dtype=q.dtype, device=q.device).masked_fill(m, float("-inf"))
        m = m.to(q.dtype)
        if shape == "kpm":
            m = m[:, None, None, :]  # [B, S] -> [B, 1, 1, S]
        elif m.dim() == 3:
            m = m.unflatten(0, (-1, q.shape[1]))  # [B·H, L, S] -> [B, H, L, S]
        merged = m if merged is None else merged + m
    return merged


def _bias_name(attr: str) -> str:
    return "in_proj_bias" if attr == "in_proj_weight" else "bias"


def _attention_blocker(module: nn.Module) -> str | None:
    """Why this attention module's heads cannot be removed physically, or None."""
    if not isinstance(getattr(module, "norm", nn.Identity()), nn.Identity):
        return "its scale_norm spans all heads"
    if getattr(module, "gate", None) is not None:
        return "its output gate spans all heads"
    return None


def _mlp_blocker(module: nn.Module) -> str | None:
    if not isinstance(getattr(module, "norm", nn.Identity()), nn.Identity):
        return "a norm sits between fc1 and fc2"
    return None


def _replace_mha(model: nn.Module, name: str, heads: int) -> HeadPrunedAttention:
    """Swap the ``nn.MultiheadAttention`` at ``name`` for a HeadPrunedAttention sharing its params."""
    mha = model.get_submodule(name)
    new = HeadPrunedAttention.from_mha(mha, heads)
    new.in_proj_weight, new.in_proj_bias = mha.in_proj_weight, mha.in_proj_bias
    new.out_proj.weight, new.out_proj.bias = mha.out_proj.weight, mha.out_proj.bias
    new.train(mha.training)
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, new)
    return new


def open_mha_out_proj(model: nn.Module, param_names: Iterable[str]) -> list[str]:
    """Make the out_proj of each ``nn.MultiheadAttention`` named in ``param_names`` swappable.

    ``nn.MultiheadAttention`` reads ``out_proj.weight`` directly inside
    ``F.multi_head_attention_forward``, so its out_proj cannot become a SparseLinear; this
    replaces such modules (packed q/k/v, no bias_k/zero-attn) by the equivalent
    :class:`HeadPrunedAttention`, which calls ``self.out_proj``. Same parameter names and
    function. Returns the names of the replaced modules.
    """
    wanted = {n.removesuffix(".out_proj.weight") for n in param_names if n.endswith(".out_proj.weight")}
    replaced = []
    for name, module in list(model.named_modules()):
        if (name in wanted and isinstance(module, nn.MultiheadAttention) and module._qkv_same_embed_dim
                and module.bias_k is None and not module.add_zero_attn):
            _replace_mha(model, name, module.num_heads)
            replaced.append(name)
    return replaced


def _set_heads(model: nn.Module, group: Group, kept: int) -> None:
    """Update the attention module's head count after its members were cut to ``kept`` heads."""
    module = model.get_submodule(group.name)
    if isinstance(module, nn.MultiheadAttention):
        _replace_mha(model, group.name, kept)
        return
    if hasattr(module, "num_attention_heads"):  # transformers 5.x
        module.num_attention_heads = kept
    for attr in ("attention", "self"):  # transformers 4.x ViT, BERT-style
        inner = getattr(module, attr, None)
        if isinstance(inner, nn.Module) and hasattr(inner, "num_attention_heads"):
            inner.num_attention_heads = kept
            inner.all_head_size = kept * inner.attention_head_size
    if hasattr(module, "num_heads"):  # timm Attention, HeadPrunedAttention
        module.num_heads = kept
        if hasattr(module, "attn_dim"):
            module.attn_dim = kept * module.head_dim


def _member_indices(group: Group, keep: torch.Tensor) -> dict[str, tuple[int, torch.Tensor]]:
    """param name -> (dim, indices to keep along dim), fused members concatenated in order;
    followers (Swin's relative-position bias table) included."""
    out: dict[str, tuple[int, list[torch.Tensor]]] = {}
    for m in (*group.members, *group.followers):
        idx = (m.offset + keep[:, None] * m.width + torch.arange(m.width)[None, :]).flatten()
        out.setdefault(m.param, (m.dim, []))[1].append(idx)
    return {p: (d, torch.cat(parts)) for p, (d, parts) in out.items()}


def blocker(model: nn.Module, group: Group) -> str | None:
    """Why ``group`` cannot be cut physically (a module spanning all its units), or None."""
    module = model.get_submodule(group.name)
    return _attention_blocker(module) if group.kind == "heads" else _mlp_blocker(module)


def apply_keep(model: nn.Module, group: Group, keep: torch.Tensor) -> dict[str, torch.Tensor]:
    """Cut ``model``'s ``group`` down to units ``keep`` (sorted int64), in place.

    Weights (and the biases of dim-0 members) are index-selected, ``in/out_features`` and the
    attention head count updated. Returns param name -> (dim, indices) as a dict of index
    tensors along each param's cut dim, for slicing masks the same way. Used by
    :func:`shrink_groups` and by ``sp.load`` (rebuilding a saved model's shapes on a skeleton).
    """
    why = blocker(model, group)
    if why is not None:
        raise ValueError(f"cannot remove units of {group.name!r}: {why}")
    cuts = _member_indices(group, keep)
    for param, (dim, idx) in cuts.items():
        _, module, attr = resolve_param(model, param)
        old = getattr(module, attr)
        setattr(module, attr, nn.Parameter(old.detach().index_select(dim, idx.to(old.device)),
                                           requires_grad=old.requires_grad))
        bias = getattr(module, _bias_name(attr), None) if dim == 0 else None
        if bias is not None:
            setattr(module, _bias_name(attr), nn.Parameter(bias.detach().index_select(0, idx.to(bias.device)),
                                                           requires_grad=bias.requires_grad))
        if isinstance(module, nn.Linear):
            # report() compares against the shape before any cut; plain attribute, so it survives
            # deepcopy and pickling but not sp.save (which rebuilds shapes from the skeleton)
            module.__dict__.setdefault(DENSE_SHAPE_ATTR, (module.out_features, module.in_features))
            module.out_features, module.in_features = module.weight.shape
    if group.kind == "heads":
        _set_heads(model, group, len(keep))
    return cuts


def _keep_units(group: Group, consumer_mask: torch.Tensor, consumer, round_to: int) -> torch.Tensor:
    """Units whose consumer slice holds a kept weight, padded up so kept·width % round_to == 0."""
    cols = consumer_mask.narrow(1, consumer.offset, group.units * consumer.width)
    alive = cols.reshape(cols.shape[0], group.units, consumer.width).any(2).any(0)
    if not alive.any():
        alive[0] = True  # a block needs at least one unit; its consumer weights are all zero
    while int(alive.sum()) * consumer.width % round_to and not alive.all():
        alive[(~alive).nonzero()[0]] = True
    return alive.nonzero().flatten()


def shrink_groups(model: nn.Module, masks: dict[str, torch.Tensor], round_to: int = 1
                  ) -> tuple[dict[str, torch.Tensor], list[ShrinkRecord], list[str]]:
    """Physically remove the dead units of every MLP/head group of ``model`` (in place).

    ``masks`` maps parameter names to boolean masks (as in a MaskSet). Returns the masks with
    every cut parameter's mask cut the same way, one record per shrunk group, and the reasons
    groups were skipped (e.g. a timm scale_norm). Groups whose consumer has no mask are kept.
    """
    masks = dict(masks)
    records: list[ShrinkRecord] = []
    skipped: list[str] = []
    for group in find_groups(model):
        consumer = next(m for m in group.members if m.dim == 1)
        if consumer.param not in masks:
            continue
        keep = _keep_units(group, masks[consumer.param], consumer, round_to)
        if len(keep) == group.units:
            continue
        why = blocker(model, group)
        if why is not None:
            skipped.append(f"{group.name} ({why})")
            continue
        for param, (dim, idx) in apply_keep(model, group, keep).items():
            if param in masks:
                masks[param] = masks[param].index_select(dim, idx.to(masks[param].device))
        records.append(ShrinkRecord(group.name, group.kind, group.units, len(keep)))
    return masks, records, skipped
