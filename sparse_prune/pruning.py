"""Pruning criteria and scopes: ``prune(model, method, ...) -> MaskSet``. Never touches weights.

Methods (``METHODS``) and the ``torch.nn.utils.prune`` function each one mirrors:

* ``random_unstructured``  ~ ``prune.random_unstructured`` (exact count, seeded)
* ``l1_unstructured``      = ``prune.l1_unstructured`` (identical masks, ties included);
  with ``scope="global"`` = ``prune.global_unstructured(..., pruning_method=L1Unstructured)``
* ``random_structured``    ~ ``prune.random_structured`` (exact count, seeded)
* ``ln_structured``        = ``prune.ln_structured`` (identical masks, ties included)
* ``nm``                   N:M semi-structured by magnitude (no torch equivalent)
* ``wanda``                activation-aware |W|·‖X‖₂ per output row (Sun et al., 2023)
* ``block``                whole ``(bm, bk)`` blocks of each weight by their Ln norm, or of the
                           Wanda score with ``score="wanda"`` (BSR-friendly masks; no torch equivalent)
* ``sparsegpt``            OBS mask choice + reconstruction of the kept weights, layer after
                           layer (Frantar & Alistarh, 2023; :mod:`sparse_prune.sparsegpt`)

Amounts follow torch: a float in [0, 1] is a fraction, an int is a count, and the count
is ``round(amount * units)`` with Python's rounding.
"""

from __future__ import annotations

import math
import numbers
import re
import warnings
import zlib
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from sparse_prune import sparsegpt as sg
from sparse_prune.calibration import check_calibration, input_norms
from sparse_prune.constants import DEFAULT_BSR_BLOCK
from sparse_prune.masks import MaskSet, fingerprint
from sparse_prune.structure import Member, scan

UNSTRUCTURED = ("random_unstructured", "l1_unstructured")
STRUCTURED = ("random_structured", "ln_structured")
METHODS = (*UNSTRUCTURED, *STRUCTURED, "nm", "wanda", "sparsegpt", "block")
CALIBRATED = ("wanda", "sparsegpt")  # need calibration=; take amount= or pattern=
BLOCK_SCORES = ("magnitude", "wanda")  # method "block": score="wanda" also needs calibration=
SCOPES = ("local", "global")

# Weights of these modules are never pruned (DESIGN: LayerNorm, embeddings, biases).
_NEVER = (nn.LayerNorm, nn.GroupNorm, nn.modules.batchnorm._NormBase, nn.Embedding, nn.EmbeddingBag)

Amount = float | int


# ---------------------------------------------------------------------------------------
# Argument checks


def check_amount(amount: Any, name: str = "amount") -> Amount:
    """Validate a torch-style amount: float in [0, 1] (fraction) or int >= 0 (count)."""
    if isinstance(amount, bool) or not isinstance(amount, numbers.Real):
        raise TypeError(
            f"{name} must be a float in [0, 1] (fraction) or an int >= 0 (count), "
            f"got {type(amount).__name__} {amount!r}"
        )
    if isinstance(amount, numbers.Integral):
        if amount < 0:
            raise ValueError(f"{name} must be >= 0 when an int (a count), got {amount}")
        return int(amount)
    amount = float(amount)
    if not math.isfinite(amount) or not 0.0 <= amount <= 1.0:
        raise ValueError(f"{name} must be a float in [0, 1] when a fraction, got {amount}")
    return amount


def count_to_prune(amount: Amount, units: int, where: str) -> int:
    """torch's ``_compute_nparams_toprune`` with its check: how many of ``units`` to prune."""
    if isinstance(amount, int):
        if amount > units:
            raise ValueError(f"amount={amount} is larger than the {units} units of {where}")
        return amount
    return round(amount * units)


def parse_pattern(pattern: Any) -> tuple[int, int]:
    """``"2:4"`` or ``(2, 4)`` -> ``(2, 4)``; requires integers with 0 < N < M."""
    try:
        if isinstance(pattern, str):
            n, m = (int(p) for p in pattern.split(":"))
        else:
            n, m = pattern
            if isinstance(n, bool) or isinstance(m, bool) or not (
                isinstance(n, numbers.Integral) and isinstance(m, numbers.Integral)
            ):
                raise TypeError
            n, m = int(n), int(m)
    except (TypeError, ValueError):
        raise ValueError(f'pattern must be "N:M" with integers 0 < N < M (e.g. "2:4"), got {pattern!r}') from None
    if not 0 < n < m:
        raise ValueError(f'pattern must be "N:M" with 0 < N < M (e.g. "2:4"), got {pattern!r}')
    return n, m


def check_norm(n: Any) -> float | str:
    """A norm order accepted by ``torch.norm``: a real number (incl. ±inf) or ``"fro"``."""
    if n == "fro":
        return "fro"
    if isinstance(n, bool) or not isinstance(n, numbers.Real) or math.isnan(n):
        raise ValueError(f'n must be a real number, inf, -inf or "fro", got {n!r}')
    return n if isinstance(n, numbers.Integral) else float(n)


def check_block(block: Any) -> tuple[int, int]:
    """``(bm, bk)``: a tuple or list of two positive ints (not bools or floats), each at most
    :data:`~sparse_prune.formats.MAX_BLOCK_SIDE` (the formats' and kernels' bound)."""
    from sparse_prune.formats import MAX_BLOCK_SIDE

    if (isinstance(block, (tuple, list)) and len(block) == 2
            and all(isinstance(b, numbers.Integral) and not isinstance(b, bool) and 1 <= b <= MAX_BLOCK_SIDE
                    for b in block)):
        return int(block[0]), int(block[1])
    raise ValueError(f"block must be a tuple or list of two positive ints (rows, columns of a block) of at most "
                     f"{MAX_BLOCK_SIDE} each, e.g. (32, 32) or (4, 1); got {block!r}")


def _check_block_norm(n: Any) -> float:
    """Norm order of the ``block`` method: a positive real, ``inf`` or ``"fro"`` (= 2)."""
    n = check_norm(n)
    if n == "fro":
        return 2.0
    if not n > 0:
        raise ValueError(f'n must be > 0, inf or "fro" for method \'block\' (a block\'s norm), got {n!r}')
    return float(n)


def _check_dim(dim: Any, ndim: int, where: str) -> int:
    if isinstance(dim, bool) or not isinstance(dim, numbers.Integral):
        raise TypeError(f"dim must be an int, got {type(dim).__name__}")
    if not -ndim <= dim < ndim:
        raise ValueError(f"dim={dim} is out of range for the {ndim}-D weight of {where} "
                         f"(allowed: {-ndim}..{ndim - 1})")
    return int(dim) % ndim


# ---------------------------------------------------------------------------------------
# What gets pruned


@dataclass
class Target:
    module_name: str
    module: nn.Module
    param: str  # full parameter name, e.g. "vit.encoder.layer.0.mlp.fc1.weight"
    weight: torch.Tensor


def _matches(name: str, rules: Sequence[Any], module: nn.Module | None) -> bool:
    for rule in rules:
        if isinstance(rule, type):
            if module is not None and isinstance(module, rule):
                return True
        elif re.search(rule, name):
            return True
    return False


def _check_rules(exclude: Any) -> tuple:
    if isinstance(exclude, (str, type)):
        exclude = (exclude,)
    exclude = tuple(exclude)
    for rule in exclude:
        if not isinstance(rule, (str, type)):
            raise TypeError(f"exclude items must be names/regexes (str) or module types, got {rule!r}")
    return exclude


def _check_include(include: Any) -> tuple[type, ...]:
    if isinstance(include, type):
        include = (include,)
    include = tuple(include)
    for cls in include:
        if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
            raise TypeError(f"include must hold nn.Module types (e.g. nn.Linear, nn.Conv2d), got {cls!r}")
        if issubclass(cls, _NEVER):
            raise ValueError(f"include={cls.__name__}: normalization and embedding weights are never pruned")
    return include


def collect_targets(model: nn.Module, include: Any = (nn.Linear,), exclude: Any = ()) -> list[Target]:
    """Weights that ``prune`` would consider, in ``named_modules`` order."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    include, exclude = _check_include(include), _check_rules(exclude)
    targets = []
    seen: set[int] = set()  # a tied weight (one Parameter in several modules) gets one mask
    for name, module in model.named_modules():
        weight = getattr(module, "weight", None)
        if not isinstance(module, include) or not isinstance(weight, torch.Tensor):
            continue
        param = f"{name}.weight" if name else "weight"
        if _matches(name, exclude, module) or _matches(param, [r for r in exclude if isinstance(r, str)], None):
            continue
        if isinstance(weight, nn.Parameter):
            if id(weight) in seen:
                continue
            seen.add(id(weight))
        if weight.device.type == "meta":
            raise ValueError(f"{param} is on the meta device (no data to prune): materialize the model first "
                             "(e.g. model.to_empty(device='cpu') and load its weights)")
        if weight.numel() == 0:
            raise ValueError(f"{param} has a zero-size weight {tuple(weight.shape)}: nothing to prune; leave it out "
                             f"with exclude=[{name!r}]")
        targets.append(Target(name, module, param, weight.detach()))
    return targets


def _warn_unmatched(model: nn.Module, include: tuple, exclude: tuple, rules: list, targets: list[Target],
                    method: str) -> None:
    """Patterns that matched nothing are typos until proven otherwise: one warning naming them
    (``exclude`` regexes matching no module or parameter, ``per_layer`` regexes matching no
    pruned weight), and one when there is nothing to prune at all, saying why."""
    import warnings

    names = [n for n, _ in model.named_modules()] + [n for n, _ in model.named_parameters()]
    dead = [r for r in exclude if isinstance(r, str) and not any(re.search(r, n) for n in names)]
    if dead:
        warnings.warn(f"prune: exclude pattern(s) {dead} matched no module or parameter of the model", stacklevel=3)
    dead = [r for r, _ in rules if not any(re.search(r, t.param) for t in targets)]
    if dead:
        warnings.warn(f"prune: per_layer pattern(s) {dead} matched none of the weights pruned", stacklevel=3)
    if targets:
        return
    from sparse_prune.nn import SparseLinear

    kinds = ", ".join(c.__name__ for c in include)
    if any(isinstance(m, SparseLinear) for m in model.modules()) and not any(
            isinstance(m, include) for m in model.modules()):
        why = f"the model is already converted (it holds SparseLinear layers and no {kinds})"
    elif not any(isinstance(m, include) for m in model.modules()):
        why = f"include=({kinds},) matched no module of the model"
    else:
        why = f"exclude={exclude!r} left out every {kinds} of the model"
    warnings.warn(f"prune({method!r}) returns an empty MaskSet: {why}", stacklevel=3)


# ---------------------------------------------------------------------------------------
# Per-weight criteria (all return a bool keep-mask of the weight's shape)


def _generator(seed: int, name: str) -> torch.Generator:
    # One stream per parameter: independent of the global RNG and of which other layers exist.
    return torch.Generator().manual_seed((int(seed) * 1_000_003 + zlib.crc32(name.encode())) % (2**63))


def _l1_unstructured(w: torch.Tensor, k: int) -> torch.Tensor:
    mask = torch.ones(w.shape, dtype=torch.bool, device=w.device)
    if k:
        # The exact call torch.nn.utils.prune.L1Unstructured makes, so ties break the same way.
        idx = torch.topk(torch.abs(w).view(-1), k=k, largest=False).indices
        mask.view(-1)[idx] = False
    return mask


def _random_unstructured(w: torch.Tensor, k: int, gen: torch.Generator) -> torch.Tensor:
    mask = torch.ones(w.numel(), dtype=torch.bool)
    mask[torch.randperm(w.numel(), generator=gen)[:k]] = False
    return mask.view(w.shape).to(w.device)


def _nm_keep(score: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Keep the n highest scores of every m consecutive entries of each row ([rows, K])."""
    rows, cols = score.shape
    groups = score.reshape(rows, cols // m, m)
    order = groups.argsort(dim=-1, descending=True, stable=True)  # ties: lower column wins
    keep = torch.zeros_like(groups, dtype=torch.bool)
    keep.scatter_(-1, order[..., :n], True)
    return keep.reshape(rows, cols)


def _as_rows(w: torch.Tensor, param: str, m: int | None = None) -> torch.Tensor:
    """Weights as GEMM rows [out, K] (Conv: K = in/groups · kh · kw, im2col order)."""
    if w.dim() < 2:
        raise ValueError(f"{param} is {w.dim()}-D; N:M, wanda and block need a >= 2-D weight")
    rows = w.reshape(w.shape[0], -1)
    if m is not None and rows.shape[1] % m:
        raise ValueError(f"{param}: in_features (K = {rows.shape[1]}) is not divisible by M = {m}")
    return rows


# ---------------------------------------------------------------------------------------
# Blocks


def block_scores(score: torch.Tensor, block: tuple[int, int], n: float = 2.0) -> torch.Tensor:
    """Per-element power mean ``‖b‖ₙ / numel(b)^(1/n)`` of every ``block`` of ``score``.

    ``score`` is ``[N, K]`` and non-negative (``|W|`` or Wanda's ``|W|·‖X‖₂``); the result is
    ``[ceil(N / bm), ceil(K / bk)]`` in fp64. Edge blocks hold fewer entries when ``N`` or ``K``
    is not a multiple of the block side; dividing by ``numel(b)^(1/n)`` (the RMS for n = 2, the
    mean for n = 1, the max for ``inf``) ranks them fairly against full blocks. For full blocks
    the order is that of the plain norm.
    """
    rows, cols = score.shape
    bm, bk = min(block[0], max(rows, 1)), min(block[1], max(cols, 1))  # a block past the weight is the weight
    padded = nn.functional.pad(score.double(), (0, -cols % bk, 0, -rows % bm))
    tiles = padded.reshape(padded.shape[0] // bm, bm, padded.shape[1] // bk, bk)
    norms = torch.linalg.vector_norm(tiles, ord=n, dim=(1, 3))
    if math.isinf(n):
        return norms
    r = torch.full((tiles.shape[0],), bm, dtype=torch.float64, device=score.device)
    c = torch.full((tiles.shape[2],), bk, dtype=torch.float64, device=score.device)
    r[-1], c[-1] = rows - (tiles.shape[0] - 1) * bm, cols - (tiles.shape[2] - 1) * bk
    return norms / (r[:, None] * c[None, :]) ** (1.0 / n)


def _keep_lowest_pruned(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Keep-flags of a 1-D ``scores``: the ``k`` lowest pruned (ties: the lower index first)."""
    keep = torch.ones(scores.numel(), dtype=torch.bool, device=scores.device)
    if k:
        keep[scores.argsort(stable=True)[:k]] = False
    return keep


def _block_mask(keep: torch.Tensor, block: tuple[int, int], weight: torch.Tensor) -> torch.Tensor:
    """Per-block keep flags ``[R, C]`` -> a bool mask of ``weight``'s shape."""
    rows = weight.shape[0]
    cols = weight.numel() // rows
    block = min(block[0], rows), min(block[1], cols)  # as block_scores: never past the weight
    full = keep.repeat_interleave(block[0], 0).repeat_interleave(block[1], 1)[:rows, :cols]
    return full.reshape(weight.shape).to(weight.device)


def _prune_blocks(targets: Sequence[Target], amount: Amount, amount_for: Callable, scope: str,
                  block: tuple[int, int], n: float, norms: Mapping[str, torch.Tensor],
                  masks: dict[str, torch.Tensor], progress: bool) -> None:
    pool: list[tuple[Target, torch.Tensor]] = []
    for t in tqdm(targets, desc="prune block", disable=not progress, leave=False):
        rows = _as_rows(t.weight, t.param)
        score = rows.abs().float()
        if norms:
            score = score * norms[t.param].to(score.device)[None, :]
        scores = block_scores(score, block, n)
        layer_amount, from_rule = amount_for(t.param)
        if scope == "global" and not from_rule:
            pool.append((t, scores))
            continue
        k = count_to_prune(layer_amount, scores.numel(), f"{t.param} ({block[0]}x{block[1]} blocks)")
        masks[t.param] = _block_mask(_keep_lowest_pruned(scores.flatten(), k).view(scores.shape), block, t.weight)
    if pool:
        # One ranking over the blocks of every pooled layer, raw scores (no per-layer scaling).
        flat = torch.cat([s.flatten().cpu() for _, s in pool])
        k = count_to_prune(amount, flat.numel(), f"all pruned layers ({block[0]}x{block[1]} blocks)")
        keep = _keep_lowest_pruned(flat, k)
        for (t, s), part in zip(pool, keep.split([s.numel() for _, s in pool]), strict=True):
            masks[t.param] = _block_mask(part.view(s.shape), block, t.weight)


# ---------------------------------------------------------------------------------------
# Structured units: one Unit set per independent weight or per dependency group


@dataclass
class _UnitSet:
    label: str
    members: tuple[Member, ...]
    units: int
    amount: Amount | None  # None: decided by the global pool


def _unit_scores(us: _UnitSet, weights: Mapping[str, torch.Tensor], n: float | str) -> torch.Tensor:
    member = us.members[0]
    w = weights[member.param]
    if len(us.members) == 1 and member.width == 1 and member.offset == 0 and w.shape[member.dim] == us.units:
        # Independent weight: torch.nn.utils.prune's _compute_norm, for identical ties.
        dims = [d for d in range(w.dim()) if d != member.dim]
        return torch.norm(w, p=n, dim=dims)
    parts = []
    for mem in us.members:
        t = weights[mem.param].narrow(mem.dim, mem.offset, us.units * mem.width)
        parts.append(t.movedim(mem.dim, 0).reshape(us.units, -1))
    return torch.norm(torch.cat(parts, dim=1).float(), p=n, dim=1)


def _unit_size(us: _UnitSet, weights: Mapping[str, torch.Tensor]) -> int:
    return sum(weights[m.param].numel() // weights[m.param].shape[m.dim] * m.width for m in us.members)


def _drop_units(masks: dict[str, torch.Tensor], us: _UnitSet, pruned: torch.Tensor) -> None:
    if pruned.numel() == 0:
        return
    for mem in us.members:
        mask = masks[mem.param]
        idx = (pruned.to(mask.device)[:, None] * mem.width + mem.offset
               + torch.arange(mem.width, device=mask.device)).reshape(-1)
        mask.index_fill_(mem.dim, idx, False)


def _pruned_units_local(us: _UnitSet, scores: torch.Tensor | None, gen: torch.Generator | None) -> torch.Tensor:
    k = count_to_prune(us.amount, us.units, us.label)
    if k == 0:
        return torch.empty(0, dtype=torch.long)
    if scores is None:  # random
        return torch.randperm(us.units, generator=gen)[:k]
    # torch.nn.utils.prune.LnStructured keeps the top (units - k) by norm; mirror it exactly.
    keep = torch.topk(scores, k=us.units - k, largest=True).indices.cpu()
    pruned = torch.ones(us.units, dtype=torch.bool)
    pruned[keep] = False
    return pruned.nonzero().flatten()


# ---------------------------------------------------------------------------------------
# The entry point


def packed_projections(model: nn.Module, targets: Sequence[Target]) -> list[str]:
    """``in_proj_weight`` of every ``nn.MultiheadAttention`` whose Linears are pruned: its packed
    q/k/v projection is no ``nn.Linear``, so per-weight methods leave it dense."""
    pruned = {t.module_name for t in targets}
    return [f"{name}.in_proj_weight" for name, m in model.named_modules()
            if isinstance(m, nn.MultiheadAttention) and isinstance(m.in_proj_weight, torch.Tensor)
            and f"{name}.out_proj".lstrip(".") in pruned]


def final_classifier(model: nn.Module) -> str | None:
    """The parameter name of the model's final classifier (output layer): the weight of its last
    ``nn.Linear`` in module order (ConvNeXt's ``head.fc``, a ViT's ``classifier``/``head``, an
    MLP's last layer); ``None`` when the model has no Linear, or that Linear is all it holds
    (``nn.Linear`` or ``Sequential(Linear)``: the layer is the model, not its head)."""
    linears = [name for name, m in model.named_modules() if isinstance(m, nn.Linear)]
    holders = [m for m in model.modules() if next(m.parameters(recurse=False), None) is not None]
    if not linears or len(holders) < 2:
        return None
    return f"{linears[-1]}.weight" if linears[-1] else "weight"


def _per_layer_rules(per_layer: Any) -> list[tuple[str, Amount]]:
    if per_layer is None:
        return []
    if not isinstance(per_layer, Mapping):
        raise TypeError(f"per_layer must be a dict {{regex: amount}}, got {type(per_layer).__name__}")
    rules = []
    for regex, amount in per_layer.items():
        if not isinstance(regex, str):
            raise TypeError(f"per_layer keys must be regex strings, got {regex!r}")
        try:
            re.compile(regex)
        except re.error as exc:
            raise ValueError(f"per_layer key {regex!r} is not a valid regex: {exc}") from None
        rules.append((regex, check_amount(amount, f"per_layer[{regex!r}]")))
    return rules


def prune(
    model: nn.Module,
    method: str,
    amount: Amount | None = None,
    *,
    scope: str = "local",
    n: float | str = 2,
    dim: int = 0,
    pattern: str | tuple[int, int] | None = None,
    seed: int = 0,
    calibration: Iterable[Any] | None = None,
    include: Any = (nn.Linear,),
    exclude: Any = (),
    per_layer: Mapping[str, Amount] | None = None,
    coupled: bool = False,
    include_classifier: bool = False,
    progress: bool = False,
    blocksize: int | None = None,
    percdamp: float | None = None,
    block: Any = None,
    score: str | None = None,
) -> MaskSet:
    """Compute pruning masks for ``model``; the model is never modified.

    Args:
        method: one of ``METHODS``.
        amount: float in [0, 1] (fraction) or int (count), as in ``torch.nn.utils.prune``.
            Not used by ``nm``; ``wanda`` takes a fraction per output row unless ``pattern``;
            ``sparsegpt`` a fraction (or count) per layer, chosen per column block; ``block``
            a fraction or count of blocks (per layer, or of all blocks with ``scope="global"``).
        scope: ``"local"`` (each weight, or each dependency group, on its own) or ``"global"``
            (one ranking over all weights / units; see README for how structured units of
            different layers are made comparable). ``nm``, ``wanda`` and ``sparsegpt`` are local only.
        n: norm order for ``ln_structured`` (real number, ``inf``, ``-inf`` or ``"fro"``) and for
            ``block`` (a block's norm: a real number > 0, ``inf`` or ``"fro"``; default 2).
        dim: axis of the structured units (0 = output neurons of a Linear); negative allowed.
        pattern: ``"N:M"`` for ``nm`` (default ``"2:4"``), ``wanda`` and ``sparsegpt`` (optional).
        seed: seed of the random methods; independent of the global RNG.
        calibration: iterable of model inputs for ``wanda`` and ``sparsegpt`` (tensor, tuple or
            dict each; ``sparsegpt`` holds them in memory).
        include: module types whose ``weight`` is pruned (``nn.Linear`` by default).
        exclude: module names/regexes (``re.search``) or module types to leave dense.
        per_layer: ``{regex: amount}``; the first regex found in a parameter name sets that
            layer's amount, and such layers are pruned locally.
        coupled: structured methods only: prune MLP neurons (fc1 rows + fc2 columns) and
            whole attention heads (q, k, v rows + output-projection columns) together, for the
            layouts :mod:`sparse_prune.structure` recognises. What it coupled and what it left
            is ``info["coupled_summary"]`` (one line); when anything was left (weights pruned on
            their own, attention modules of a layout it does not know, whose heads stay whole)
            that line is also a ``UserWarning``.
        include_classifier: structured methods only: also prune the final classifier's rows
            (:func:`final_classifier`: the last ``nn.Linear``). Off by default, because a pruned
            output row is a class that can never be predicted; ``info["classifier_excluded"]``
            names the weight left out. Other methods always include it (unless ``exclude``).
        progress: tqdm bars (``sparsegpt``: one over the layers, one per layer over the batches).
        blocksize: ``sparsegpt`` only: columns per lazy-update block (default 128; a multiple
            of M for N:M).
        percdamp: ``sparsegpt`` only: Hessian dampening as a fraction of its mean diagonal
            (default 0.01).
        block: ``block`` only: ``(bm, bk)`` rows x columns of a block of the weight ``[N, K]``
            (Conv: the ``[out, in·kh·kw]`` GEMM rows), two positive ints; default
            ``constants.DEFAULT_BSR_BLOCK`` (32, 32). Edge blocks are partial when ``N`` or ``K``
            is not a multiple; blocks are ranked by ``‖b‖ₙ / numel(b)^(1/n)`` so those compare
            fairly (see :func:`block_scores`); ties: the earlier block (row-major) is pruned first.
        score: ``block`` only: ``"magnitude"`` (``|W|``, default) or ``"wanda"`` (``|W_ij|·‖X_j‖₂``
            from ``calibration``, gathered as for method ``wanda``).

    Returns:
        ``MaskSet`` with a ``torch.bool`` mask (True = keep) for every pruned parameter, its
        ``info`` holding the arguments and the model's :func:`~sparse_prune.masks.fingerprint`
        (checked by ``apply``/``attach``/``convert``);
        ``sparsegpt`` also fills ``MaskSet.weights`` with the reconstructed weights (zero where
        pruned, the parameters' dtype), which ``apply``/``attach``/``convert``/``save`` use.

    Raises:
        ValueError / TypeError naming the argument, before anything is computed where possible.
    """
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; valid methods: {', '.join(METHODS)}")
    if scope not in SCOPES:
        raise ValueError(f"scope must be one of {SCOPES}, got {scope!r}")
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
        raise TypeError(f"seed must be an int, got {seed!r}")
    rules = _per_layer_rules(per_layer)
    if method != "block" and (block is not None or score is not None):
        raise ValueError(f"block= and score= apply to method 'block', not {method!r}")
    if method == "block":
        block = check_block(DEFAULT_BSR_BLOCK if block is None else block)
        score = "magnitude" if score is None else score
        if score not in BLOCK_SCORES:
            raise ValueError(f"score must be one of {BLOCK_SCORES} for method 'block', got {score!r}")
        n = _check_block_norm(n)
        if score == "wanda" and calibration is None:
            raise ValueError("method 'block' with score='wanda' needs calibration= (an iterable of model inputs)")
        if score == "magnitude" and calibration is not None:
            raise ValueError("calibration= is used by score='wanda' only; method 'block' scores by magnitude here")
    nm = None
    if method == "nm":
        if amount is not None:
            raise ValueError("method 'nm' takes pattern= (e.g. '2:4'), not amount=")
        nm = parse_pattern("2:4" if pattern is None else pattern)
    else:
        if pattern is not None and method not in CALIBRATED:
            raise ValueError(f"pattern= applies to 'nm', 'wanda' and 'sparsegpt', not {method!r}")
        if method in CALIBRATED and pattern is not None:
            nm = parse_pattern(pattern)
            if amount is not None:
                raise ValueError(f"{method} takes either amount= (unstructured) or pattern= (N:M), not both")
        elif amount is None:
            raise TypeError(f"method {method!r} needs amount= (float fraction or int count)")
        else:
            amount = check_amount(amount)
    if method in ("nm", *CALIBRATED) and scope == "global":
        raise ValueError(f"method {method!r} compares weights within a row: scope must be 'local'")
    if method == "ln_structured":
        n = check_norm(n)
    if coupled and method not in STRUCTURED:
        raise ValueError(f"coupled=True applies to structured methods {STRUCTURED}, not {method!r}")
    if method in CALIBRATED and calibration is None:
        raise ValueError(f"method {method!r} needs calibration= (an iterable of model inputs)")
    if method != "sparsegpt" and (blocksize is not None or percdamp is not None):
        raise ValueError(f"blocksize= and percdamp= apply to 'sparsegpt', not {method!r}")
    if method == "sparsegpt":
        blocksize, percdamp = sg.check_options(sg.DEFAULT_BLOCKSIZE if blocksize is None else blocksize,
                                               sg.DEFAULT_PERCDAMP if percdamp is None else percdamp, nm)
        if nm is not None and rules:
            raise ValueError("per_layer amounts apply to amount=, not pattern= (use exclude= to keep layers dense)")

    if calibration is not None:
        check_calibration(calibration, method)
    if not isinstance(include_classifier, bool):
        raise TypeError(f"include_classifier must be a bool, got {include_classifier!r}")
    if include_classifier and method not in STRUCTURED:
        raise ValueError(f"include_classifier=True applies to structured methods {STRUCTURED} (the others "
                         f"prune the classifier unless excluded), not {method!r}")
    targets = collect_targets(model, include, exclude)
    exclude = _check_rules(exclude)
    _warn_unmatched(model, _check_include(include), exclude, rules, targets, method)
    classifier = final_classifier(model) if method in STRUCTURED and not include_classifier else None
    if classifier is not None and any(t.param == classifier for t in targets):
        targets = [t for t in targets if t.param != classifier]
    else:
        classifier = None

    def amount_for(name: str) -> tuple[Amount | None, bool]:
        for regex, value in rules:
            if re.search(regex, name):
                return value, True
        return amount, False

    info = {"method": method, "amount": amount, "scope": scope, "seed": int(seed),
            "coupled": bool(coupled), "fingerprint": fingerprint(model)}
    if method in STRUCTURED:
        info["classifier_excluded"] = classifier
    packed = [] if (coupled and method in STRUCTURED) else packed_projections(model, targets)
    if packed:  # honest: sparsity() is over the masked weights, and these are not among them
        info["not_pruned"] = packed
        warnings.warn(f"{method} left {len(packed)} packed q/k/v projection(s) of nn.MultiheadAttention unpruned "
                      f"(no nn.Linear: {', '.join(packed[:3])}{', ...' if len(packed) > 3 else ''}); sparsity() "
                      "counts the masked weights only. coupled structured pruning removes their heads.",
                      stacklevel=2)
    if method == "ln_structured":
        info["n"] = n if isinstance(n, str) else float(n)
    if method in STRUCTURED:
        info["dim"] = dim
    if method == "block":
        info.update(block=list(block), score=score, n=n)
    if nm is not None:
        info["pattern"] = f"{nm[0]}:{nm[1]}"
    masks: dict[str, torch.Tensor] = {}

    if method == "sparsegpt":
        info.update(blocksize=blocksize, percdamp=percdamp)
        masks, weights = sg.sparsegpt(
            model, targets, calibration,
            lambda param: {"pattern": nm} if nm is not None else {"amount": amount_for(param)[0]},
            blocksize=blocksize, percdamp=percdamp, progress=progress)
        order = [t.param for t in targets]
        return MaskSet({p: masks[p] for p in order}, info, weights={p: weights[p] for p in order})

    if method in STRUCTURED:
        summary = _prune_structured(model, method, targets, amount, amount_for, scope, n, dim, seed, coupled,
                                    exclude, masks, progress)
        if coupled:
            info["coupled_summary"] = summary[0]
            if summary[1]:
                warnings.warn(summary[0], stacklevel=2)
        order = [name for name, _ in model.named_parameters() if name in masks]
        return MaskSet({name: masks[name] for name in order}, info)

    wanda_score = method == "wanda" or (method == "block" and score == "wanda")
    norms = input_norms(model, targets, calibration, progress) if wanda_score else {}
    if method == "block":
        _prune_blocks(targets, amount, amount_for, scope, block, n, norms, masks, progress)
        return MaskSet({t.param: masks[t.param] for t in targets}, info)
    global_pool: list[Target] = []
    for t in tqdm(targets, desc=f"prune {method}", disable=not progress, leave=False):
        layer_amount, from_rule = amount_for(t.param)
        if method == "nm" or (method == "wanda" and nm is not None):
            rows = _as_rows(t.weight, t.param, nm[1])
            score = rows.abs().float()
            if method == "wanda":
                score = score * norms[t.param].to(score.device)[None, :]
            masks[t.param] = _nm_keep(score, *nm).view(t.weight.shape)
        elif method == "wanda":
            rows = _as_rows(t.weight, t.param)
            k = count_to_prune(layer_amount, rows.shape[1], f"each row of {t.param}")
            score = rows.abs().float() * norms[t.param].to(rows.device)[None, :]
            keep = torch.ones_like(rows, dtype=torch.bool)
            if k:
                keep.scatter_(1, torch.topk(score, k, dim=1, largest=False).indices, False)
            masks[t.param] = keep.view(t.weight.shape)
        elif scope == "global" and not from_rule:
            global_pool.append(t)
        else:
            k = count_to_prune(layer_amount, t.weight.numel(), t.param)
            if method == "l1_unstructured":
                masks[t.param] = _l1_unstructured(t.weight, k)
            else:
                masks[t.param] = _random_unstructured(t.weight, k, _generator(seed, t.param))
    if global_pool:
        flat = torch.cat([t.weight.reshape(-1).to(global_pool[0].weight.device) for t in global_pool])
        k = count_to_prune(amount, flat.numel(), "all pruned weights")
        if method == "l1_unstructured":
            keep = _l1_unstructured(flat, k)  # = torch's global_unstructured with L1Unstructured
        else:
            keep = _random_unstructured(flat, k, torch.Generator().manual_seed(int(seed)))
        for t, part in zip(global_pool, keep.split([t.weight.numel() for t in global_pool]), strict=True):
            masks[t.param] = part.view(t.weight.shape).to(t.weight.device)
    return MaskSet({t.param: masks[t.param] for t in targets if t.param in masks}, info)


def _prune_structured(model, method, targets, amount, amount_for, scope, n, dim, seed, coupled, exclude,
                      masks, progress) -> tuple[str, bool]:
    """Fill ``masks``; return (the one-line coupled summary, whether anything was left uncoupled)."""
    weights = {t.param: t.weight for t in targets}
    unit_sets: list[_UnitSet] = []
    grouped: set[str] = set()
    kinds = {"mlp": 0, "heads": 0}
    excluded_groups = 0
    left: list[str] = []
    if coupled:
        params = dict(model.named_parameters())
        modules = dict(model.named_modules())
        groups, left = scan(model)
        for group in groups:
            if any(_matches(p, exclude, modules.get(p.rpartition(".")[0])) for p in group.params):
                excluded_groups += 1
                continue
            kinds[group.kind] += 1
            for p in group.params:
                weights[p] = params[p].detach()
            layer_amount, from_rule = next(
                ((a, r) for a, r in map(amount_for, group.params) if r), (amount_for(group.params[0])[0], False))
            unit_sets.append(_UnitSet(f"{group.kind} group {group.name}", group.members, group.units,
                                      layer_amount if (scope == "local" or from_rule) else None))
            grouped.update(group.params)
    alone = [t.param for t in targets if t.param not in grouped]
    for t in targets:
        if t.param in grouped:
            continue
        if t.weight.dim() < 2:
            raise ValueError(f"structured pruning needs a >= 2-D weight; {t.param} is {t.weight.dim()}-D")
        d = _check_dim(dim, t.weight.dim(), t.param)
        layer_amount, from_rule = amount_for(t.param)
        unit_sets.append(_UnitSet(t.param, (Member(t.param, d),), t.weight.shape[d],
                                  layer_amount if (scope == "local" or from_rule) else None))

    for p, w in weights.items():
        masks[p] = torch.ones(w.shape, dtype=torch.bool, device=w.device)
    ln = method == "ln_structured"
    pool: list[tuple[_UnitSet, torch.Tensor | None]] = []
    for us in tqdm(unit_sets, desc=f"prune {method}", disable=not progress, leave=False):
        scores = _unit_scores(us, weights, n) if ln else None
        if us.amount is None:
            pool.append((us, scores))
        else:
            _drop_units(masks, us, _pruned_units_local(us, scores, _generator(seed, us.label)))
    if pool:
        total = sum(us.units for us, _ in pool)
        k = count_to_prune(amount, total, "all structured units")
        if ln:
            # Units of different sizes are compared by their per-element power mean
            # ‖u‖ₙ / numel(u)^(1/n), so a 3072-wide row is not favoured over a 768-wide one.
            p = 2.0 if n == "fro" else float(n)
            scale = (lambda size: size ** (1.0 / p)) if math.isfinite(p) and p > 0 else (lambda size: 1.0)
            flat = torch.cat([s.float().cpu() / scale(_unit_size(us, weights)) for us, s in pool])
            keep = torch.topk(flat, k=total - k, largest=True).indices
            pruned_flat = torch.ones(total, dtype=torch.bool)
            pruned_flat[keep] = False
        else:
            pruned_flat = torch.zeros(total, dtype=torch.bool)
            pruned_flat[torch.randperm(total, generator=torch.Generator().manual_seed(int(seed)))[:k]] = True
        for (us, _), part in zip(pool, pruned_flat.split([us.units for us, _ in pool]), strict=True):
            _drop_units(masks, us, part.nonzero().flatten())
    if not coupled:
        return "", False
    line = f"coupled: {kinds['mlp']} MLP group(s), {kinds['heads']} attention-head group(s)"
    if excluded_groups:
        line += f"; {excluded_groups} group(s) excluded"
    if alone:
        shown = ", ".join(alone[:4]) + (f", ... ({len(alone)} in all)" if len(alone) > 4 else "")
        line += f"; pruned on their own (in no group, along dim {dim}): {shown}"
    if left:
        shown = ", ".join(left[:3]) + (f", ... ({len(left)} in all)" if len(left) > 3 else "")
        line += f"; attention of a layout not recognised, heads left whole: {shown}"
    if not any(kinds.values()) and not left:
        line += "; no MLP or attention block recognised in this model"
    return line, bool(alone or left or not any(kinds.values()))
