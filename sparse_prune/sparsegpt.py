"""SparseGPT (Frantar & Alistarh, 2023): one-shot pruning that reconstructs the kept weights.

Per layer ``y = W x`` (``W [N, K]``), from calibration inputs ``X [K, T]`` (T tokens):

1. ``H = 2 X Xᵀ / T`` (fp32 accumulation, forward hooks), dead inputs (``H_jj = 0``) decoupled,
   dampened by ``percdamp`` × the mean of the live diagonal;
2. ``U`` = the upper Cholesky factor of ``H⁻¹`` (fp64, from one Cholesky of the reversed ``H``);
3. columns left to right in blocks of ``blocksize``: the mask is chosen by the OBS saliency
   ``w² / U_jj²`` (unstructured: the smallest scores of each ``[N, blocksize]`` block, exact
   counts; N:M: the ``M - N`` smallest of every M columns of each row, chosen when the group's
   first column is reached, on the updated weights), each pruned column's error is spread over
   the columns to its right (``W[:, j:] -= (w - q) / U_jj · U_j,j:``), lazily per block.

:func:`prune_layer` does one layer; :func:`sparsegpt` runs it over a model **sequentially**:
each layer is calibrated on the outputs of the already pruned and reconstructed layers before
it. The work happens on a deep copy (the model passed in is never modified). When the model
has a run of identical blocks (a ViT encoder), block inputs are cached and each block runs on
them, so the cost is a few forwards of the model in all, not one per layer.

Dead inputs (a column never non-zero on the calibration data) get saliency 0, so they are
pruned first; if kept, their weights keep their original values (no error reaches them).
"""

from __future__ import annotations

import contextlib
import copy
import numbers
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from sparse_prune.calibration import (
    call_model,
    check_calibration,
    check_finite_sum,
    mha_out_proj_hook,
    move_batch,
    run_batch,
)

DEFAULT_BLOCKSIZE = 128
DEFAULT_PERCDAMP = 0.01


class _Stop(Exception):
    """Raised by a calibration hook once it has what it needs: the rest of the forward is skipped."""


def check_options(blocksize: Any, percdamp: Any, pattern: tuple[int, int] | None) -> tuple[int, float]:
    """Validate ``blocksize`` (int >= 1, a multiple of M for N:M) and ``percdamp`` (float >= 0)."""
    if isinstance(blocksize, bool) or not isinstance(blocksize, numbers.Integral) or blocksize < 1:
        raise ValueError(f"blocksize must be an int >= 1, got {blocksize!r}")
    if pattern is not None and blocksize % pattern[1]:
        raise ValueError(f"blocksize={blocksize} must be a multiple of M = {pattern[1]} (pattern "
                         f"{pattern[0]}:{pattern[1]})")
    if isinstance(percdamp, bool) or not isinstance(percdamp, numbers.Real) or not 0 <= percdamp < float("inf"):
        raise ValueError(f"percdamp must be a finite float >= 0 (fraction of the mean Hessian diagonal), "
                         f"got {percdamp!r}")
    return int(blocksize), float(percdamp)


def _inverse_cholesky(hessian: torch.Tensor, percdamp: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(upper Cholesky factor of the dampened ``H⁻¹`` [K, K] fp32, dead-input flags [K] bool)."""
    H = hessian.detach().to(torch.float64).clone()
    if not bool(torch.isfinite(H).all()):  # no dampening fixes that: say what is wrong
        raise ValueError(f"the calibration Hessian (K = {H.shape[0]}) holds NaN or inf: the calibration inputs "
                         "(or the activations they produce) are not finite; give finite calibration data")
    diag = H.diagonal()
    dead = diag <= 0
    live_mean = diag[~dead].mean() if bool((~dead).any()) else torch.tensor(1.0, dtype=H.dtype)
    H[dead, :] = 0
    H[:, dead] = 0
    diag[dead] = live_mean  # decoupled: no error flows to or from a dead input
    diag += percdamp * live_mean
    # U without forming H⁻¹: with J the reversal, J H J = L Lᵀ gives H⁻¹ = (J L⁻¹ J)ᵀ (J L⁻¹ J),
    # and J L⁻¹ J is upper triangular (one Cholesky + one triangular solve, not three).
    L, info = torch.linalg.cholesky_ex(H.flip(0, 1))
    if int(info):
        raise ValueError(f"the calibration Hessian is not positive definite (K = {H.shape[0]}); "
                         f"raise percdamp (now {percdamp}) or give more calibration data")
    eye = torch.eye(H.shape[0], dtype=H.dtype, device=H.device)
    U = torch.linalg.solve_triangular(L, eye, upper=False).flip(0, 1)
    return U.to(torch.float32), dead


def _smallest(score: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the ``k`` smallest entries along the last dim (ties: lower index first)."""
    return score.argsort(dim=-1, stable=True)[..., :k]


def _columns(W1: torch.Tensor, U1: torch.Tensor, P1: torch.Tensor, Q1: torch.Tensor, Err1: torch.Tensor,
             pattern: tuple[int, int] | None, d2: torch.Tensor, live: torch.Tensor) -> None:
    """One block, column by column (rows of the transposed ``W1 [B, N]``): N:M choice, OBS update."""
    for i in range(W1.shape[0]):
        if pattern is not None and i % pattern[1] == 0:
            n, m = pattern
            score = (W1[i:i + m].pow(2) / d2[i:i + m] * live[i:i + m]).T  # [N, m]
            sel = torch.zeros_like(score, dtype=torch.bool).scatter_(1, _smallest(score, m - n), True)
            P1[i:i + m] = sel.T
        w = W1[i]
        q = w.masked_fill(P1[i], 0.0)
        err = (w - q) / U1[i, i]
        W1[i:].addr_(U1[i, i:], err, alpha=-1.0)  # the OBS update of the columns to the right
        Q1[i] = q
        Err1[i] = err


@contextlib.contextmanager
def _single_thread(on: bool) -> Iterator[None]:
    """One intra-op thread for the column loop's small ops: as fast as two on idle cores here,
    and immune to thread hand-off stalls when the cores are shared (seen here: an fc1-shaped
    3072x768 layer took 3.9 s with two threads under another job's load, 0.19 s with one)."""
    before = torch.get_num_threads()
    if on and before > 1:
        torch.set_num_threads(1)
    try:
        yield
    finally:
        if torch.get_num_threads() != before:
            torch.set_num_threads(before)


@torch.no_grad()
def prune_layer(weight: torch.Tensor, hessian: torch.Tensor, amount: float | int | None = None,
                pattern: tuple[int, int] | None = None, blocksize: int = DEFAULT_BLOCKSIZE,
                percdamp: float = DEFAULT_PERCDAMP, single_thread: bool = True,
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """SparseGPT on one weight.

    Args:
        weight: ``[N, K]`` floating (GEMM rows; a conv weight flattened in im2col order).
        hessian: ``[K, K]``, ``X Xᵀ`` of the layer's inputs up to a positive scale (any float dtype).
        amount: fraction (float in [0, 1]) or count (int) of the weights to prune; exclusive
            with ``pattern``. Counts are exact per layer, spread over the column blocks.
        pattern: ``(n, m)``: keep n of every m consecutive inputs of each row.
        blocksize: columns per lazy-update block (a multiple of m for N:M).
        percdamp: dampening, as a fraction of the mean diagonal of the live inputs.

    Returns:
        ``(keep, new_weight)``: ``torch.bool [N, K]`` (True = kept) and the reconstructed
        weight (fp32, zero where pruned).

    Raises:
        ValueError: shapes disagree, ``amount``/``pattern`` both or neither given, or the
        dampened Hessian is not positive definite (``percdamp=0`` on rank-deficient inputs).
    """
    if weight.dim() != 2 or hessian.shape != (weight.shape[1], weight.shape[1]):
        raise ValueError(f"weight must be [N, K] and hessian [K, K]; got {tuple(weight.shape)} and "
                         f"{tuple(hessian.shape)}")
    if (amount is None) == (pattern is None):
        raise ValueError("give either amount= (unstructured) or pattern= (N:M)")
    blocksize, percdamp = check_options(blocksize, percdamp, pattern)
    rows, cols = weight.shape
    if pattern is not None and cols % pattern[1]:
        raise ValueError(f"in_features (K = {cols}) is not divisible by M = {pattern[1]} (pattern)")
    total = 0
    if pattern is None:
        total = amount if isinstance(amount, int) else round(amount * rows * cols)
        if not 0 <= total <= rows * cols:
            raise ValueError(f"amount={amount} is outside 0..{rows * cols} weights")
    # Transposed, so that a column of W is a contiguous row: WT [K, N].
    WT = weight.detach().to(torch.float32).T.contiguous()
    U, dead = _inverse_cholesky(hessian.to(WT.device), percdamp)
    live = (~dead).to(WT.dtype)[:, None]
    d2 = U.diagonal().pow(2)[:, None]
    prunedT = torch.zeros(cols, rows, dtype=torch.bool, device=WT.device)
    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        W1 = WT[i1:i2].clone()  # [B, N]
        U1 = U[i1:i2, i1:i2]
        P1 = torch.zeros_like(W1, dtype=torch.bool)
        Q1 = torch.zeros_like(W1)
        Err1 = torch.zeros_like(W1)
        if pattern is None:
            # cumulative rounding: the blocks' counts add up to exactly ``total``
            k = (2 * total * i2 + cols) // (2 * cols) - (2 * total * i1 + cols) // (2 * cols)
            score = (W1.pow(2) / d2[i1:i2] * live[i1:i2]).T  # [N, B]: ties go row-major
            flat = torch.zeros(rows * (i2 - i1), dtype=torch.bool, device=WT.device)
            flat[_smallest(score.reshape(-1), k)] = True
            P1 = flat.view(rows, i2 - i1).T.contiguous()
        with _single_thread(single_thread):
            _columns(W1, U1, P1, Q1, Err1, pattern, d2[i1:i2], live[i1:i2])
        WT[i1:i2] = Q1
        WT[i2:].addmm_(U[i1:i2, i2:].T, Err1, alpha=-1.0)  # the block's lazy update of the rest
        prunedT[i1:i2] = P1
    return ~prunedT.T.contiguous(), WT.T.contiguous()


# ---------------------------------------------------------------------------------------
# Calibration: Hessians from forward hooks


def _check_conv(module: nn.Conv2d, where: str) -> None:
    if module.groups != 1 or module.padding_mode != "zeros" or isinstance(module.padding, str):
        raise ValueError(f"sparsegpt supports ungrouped Conv2d with numeric zero padding; {where} has "
                         f"groups={module.groups}, padding={module.padding!r}, padding_mode={module.padding_mode!r}")


def layer_inputs(module: nn.Module, x: torch.Tensor, where: str) -> torch.Tensor:
    """The GEMM inputs ``[T, K]`` (fp32) of a Linear or ungrouped Conv2d call (im2col order)."""
    if isinstance(module, nn.Conv2d):
        _check_conv(module, where)
        cols = F.unfold(x.float(), module.kernel_size, module.dilation, module.padding, module.stride)
        return cols.transpose(1, 2).reshape(-1, cols.shape[1])
    return x.detach().float().reshape(-1, x.shape[-1])


@dataclass
class HessianSum:
    """Running ``Σ x xᵀ`` (fp32) over the tokens seen; ``hessian()`` = ``2 X Xᵀ / T``."""

    k: int
    device: torch.device
    total: torch.Tensor = field(init=False)
    tokens: int = 0

    def __post_init__(self) -> None:
        self.total = torch.zeros(self.k, self.k, dtype=torch.float32, device=self.device)

    def add(self, x: torch.Tensor) -> None:
        x = x.to(self.total.device)
        self.total.addmm_(x.T, x)
        self.tokens += x.shape[0]

    def hessian(self) -> torch.Tensor:
        return self.total * (2.0 / max(1, self.tokens))


# ---------------------------------------------------------------------------------------
# The model driver: sequential, one layer at a time, on a copy


@dataclass
class _Inputs:
    args: tuple
    kwargs: dict


def _find_blocks(model: nn.Module, target_modules: Sequence[str]) -> tuple[str, list[nn.Module]]:
    """The ``nn.ModuleList``/``nn.Sequential`` of >= 2 same-class children holding most targets."""
    best: tuple[int, str, list[nn.Module]] = (0, "", [])
    for name, module in model.named_modules():
        if not isinstance(module, (nn.ModuleList, nn.Sequential)):
            continue
        children = list(module.children())
        if len(children) < 2 or len({type(c) for c in children}) != 1:
            continue
        prefix = f"{name}." if name else ""
        held = sum(1 for t in target_modules if t.startswith(prefix))
        if held > best[0]:
            best = (held, name, children)
    return best[1], best[2]


def _first(out: Any) -> Any:
    return out[0] if isinstance(out, (tuple, list)) else out


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.shape == b.shape
                and torch.allclose(a, b, rtol=1e-4, atol=1e-5))
    if isinstance(a, (tuple, list)) and isinstance(b, (tuple, list)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    return a is b or a == b


@torch.no_grad()
def sparsegpt(model: nn.Module, targets: Sequence[Any], calibration: Iterable[Any],
              layer_options: Callable[[str], dict[str, Any]], *, blocksize: int = DEFAULT_BLOCKSIZE,
              percdamp: float = DEFAULT_PERCDAMP, progress: bool = False, use_blocks: bool = True,
              ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Prune ``targets`` (``pruning.Target`` of ``model``) sequentially with SparseGPT.

    ``layer_options(param)`` gives ``{"amount": ...}`` or ``{"pattern": (n, m)}`` per layer.
    ``calibration``: model inputs (tensor, tuple or dict each), read into memory once.
    ``use_blocks=False`` runs the whole model for every layer (no block cache; the reference
    for the cached path, and the path for models without a run of identical blocks).

    Returns ``(masks, weights)``, both keyed by parameter name; weights have the parameter's
    dtype and device, zero where pruned. ``model`` is not modified (the work is on a copy).
    """
    if not targets:
        return {}, {}
    for t in targets:  # every per-layer check before any work
        if not isinstance(t.module, (nn.Linear, nn.Conv2d)):
            raise TypeError(f"sparsegpt prunes nn.Linear and nn.Conv2d weights; {t.param} belongs to a "
                            f"{type(t.module).__name__} (set include=)")
        if isinstance(t.module, nn.Conv2d):
            _check_conv(t.module, t.param)
        opts, numel, k = layer_options(t.param), t.weight.numel(), t.weight[0].numel()
        if "pattern" in opts and k % opts["pattern"][1]:
            raise ValueError(f"{t.param}: in_features (K = {k}) is not divisible by M = {opts['pattern'][1]} "
                             f"(pattern)")
        if isinstance(opts.get("amount"), int) and opts["amount"] > numel:
            raise ValueError(f"amount={opts['amount']} is larger than the {numel} weights of {t.param}")
    device = targets[0].weight.device
    batches = [move_batch(b, device) for b in check_calibration(calibration, "sparsegpt")]
    if not batches:
        raise ValueError("calibration is empty: give an iterable of model inputs (tensors, tuples or dicts)")
    work = copy.deepcopy(model).eval()
    modules = dict(work.named_modules())
    mods = {t.param: modules[t.module_name] for t in targets}
    owners = {id(m.out_proj): m for m in work.modules() if isinstance(m, nn.MultiheadAttention)}

    def hook_on(param: str, inner: Callable[[nn.Module, torch.Tensor], None]) -> Any:
        """A hook that gives ``inner`` the layer's input; MHA out_proj via its attention module."""
        mod = mods[param]
        if id(mod) in owners:
            return owners[id(mod)].register_forward_hook(
                mha_out_proj_hook(lambda m, args, out: inner(m, args[0])), with_kwargs=True)
        return mod.register_forward_pre_hook(lambda m, args: inner(m, args[0]))

    # 1. Call order (and every layer reached at all). Layers called one after another on the
    #    same input tensor (q, k, v) form one stage: one Hessian, none depends on the others.
    order: list[str] = []
    stages: list[list[str]] = []
    last: list[Any] = [None]

    def record(param: str) -> Callable:
        def inner(m: nn.Module, x: torch.Tensor) -> None:
            if param not in order:
                order.append(param)
                if stages and x is last[0]:
                    stages[-1].append(param)
                else:
                    stages.append([param])
            last[0] = x
        return inner

    handles = [hook_on(t.param, record(t.param)) for t in targets]
    try:
        for i, b in enumerate(batches):
            run_batch(work, b, i)
            if len(order) == len(targets):
                break
    finally:
        for h in handles:
            h.remove()
        last[0] = None
    missing = [t.param for t in targets if t.param not in order]
    if missing:
        raise ValueError(f"calibration inputs never reached {len(missing)} layer(s), e.g. {missing[0]}")

    # 2. Blocks whose inputs can be cached.
    names = {t.param: t.module_name for t in targets}
    blocks_name, blocks = _find_blocks(work, list(names.values())) if use_blocks else ("", [])
    prefix = f"{blocks_name}." if blocks_name else ""

    children = [n for n, _ in (modules[blocks_name] if blocks_name else work).named_children()] if blocks else []

    def block_of(param: str) -> int | None:
        if not blocks or not names[param].startswith(prefix):
            return None
        child = names[param][len(prefix):].split(".")[0]
        return children.index(child) if child in children else None

    def capture(b: int, only: int | None = None) -> list[_Inputs]:
        """Inputs of block ``b`` from whole-model forwards (stopped at the block)."""
        got: list[_Inputs] = []

        def pre(m: nn.Module, args: tuple, kwargs: dict) -> None:
            got.append(_Inputs(args, kwargs))
            raise _Stop

        h = blocks[b].register_forward_pre_hook(pre, with_kwargs=True)
        try:
            for batch in batches[:only]:
                try:
                    call_model(work, batch)
                except _Stop:
                    pass
        finally:
            h.remove()
        return got

    def chain(b: int, inputs: list[_Inputs]) -> list[_Inputs]:
        """Inputs of block ``b + 1``: block ``b``'s first output with the same other arguments."""
        return [_Inputs((_first(blocks[b](*i.args, **i.kwargs)), *i.args[1:]), i.kwargs) for i in inputs]

    cache: tuple[int, list[_Inputs]] | None = None
    chain_ok: bool | None = None

    def inputs_of(b: int) -> list[_Inputs]:
        nonlocal cache, chain_ok
        if cache is not None and cache[0] == b:
            return cache[1]
        if cache is not None and cache[0] == b - 1 and chain_ok is not False:
            nxt = chain(b - 1, cache[1])
            if chain_ok is None:  # check once that blocks are chained as assumed
                ref = capture(b, only=1)
                chain_ok = bool(ref) and _same((ref[0].args, ref[0].kwargs), (nxt[0].args, nxt[0].kwargs))
            if chain_ok:
                cache = (b, nxt)
                return nxt
        cache = (b, capture(b))
        return cache[1]

    # 3. Layer by layer in call order, each on the outputs of the pruned layers before it.
    masks: dict[str, torch.Tensor] = {}
    weights: dict[str, torch.Tensor] = {}
    by_param = {t.param: t for t in targets}
    bar = tqdm(total=len(order), desc="sparsegpt", disable=not progress, leave=False)
    for stage in stages:
        first = mods[stage[0]]
        acc = HessianSum(first.weight[0].numel(), device)

        def take(m: nn.Module, x: torch.Tensor, param: str = stage[0], acc: HessianSum = acc) -> None:
            acc.add(layer_inputs(mods[param], x, param))
            raise _Stop

        b = block_of(stage[0])
        runs: list[Callable[[], Any]]
        if b is None:
            runs = [lambda batch=batch: call_model(work, batch) for batch in batches]
        else:
            runs = [lambda i=i, blk=blocks[b]: blk(*i.args, **i.kwargs) for i in inputs_of(b)]
        h = hook_on(stage[0], take)
        try:
            for run in tqdm(runs, desc=", ".join(stage), disable=not progress, leave=False):
                try:
                    run()
                except _Stop:
                    pass
        finally:
            h.remove()
        check_finite_sum(acc.total, acc.tokens, stage[0], "sparsegpt")
        hessian = acc.hessian()
        for param in stage:
            mod = mods[param]
            rows = mod.weight.reshape(mod.weight.shape[0], -1)
            keep, new = prune_layer(rows, hessian, blocksize=blocksize, percdamp=percdamp, **layer_options(param))
            new = new.to(mod.weight.dtype).view(mod.weight.shape)
            mod.weight.copy_(new)  # the copy now computes with the pruned layer
            masks[param] = keep.view(mod.weight.shape)
            weights[param] = new.to(by_param[param].weight.device)
            bar.update()
        if b is None:
            cache = None  # an out-of-block layer may feed any block
    bar.close()
    return masks, weights
