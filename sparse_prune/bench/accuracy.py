"""The seed's accuracy study: top-1 accuracy against pruning ratio per method, with finetuning.

``run_study(...)`` returns rows (dicts) with ``model``, ``data``, ``method``, ``pattern``,
``block`` (``[bm, bk]`` for method ``block``, else None), ``scope``, ``amount``, ``sparsity`` (measured over the pruned parameters), ``accuracy``,
``dense_accuracy``, ``finetuned``, ``epochs``, ``iterative`` (rounds), ``prune_s`` and
``finetune_s``. ``write_study(rows, out)`` writes ``accuracy.json``, ``accuracy.md`` and,
with matplotlib, ``accuracy.png`` (one panel per method; finetuned points marked).
"""

from __future__ import annotations

import copy
import json
import math
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from sparse_prune import atomic
from sparse_prune.bench.train import evaluate, train
from sparse_prune.masks import MaskSet
from sparse_prune.pruning import CALIBRATED, METHODS, check_amount, check_block, prune

SEED_METHODS = ("random_unstructured", "l1_unstructured", "random_structured", "ln_structured")
DEFAULT_METHODS = (*SEED_METHODS, "nm", "wanda", "sparsegpt", "block")
# Method "block" sweeps the same amounts once per block shape: a CPU-friendly 4x1 and a GPU 16x16.
DEFAULT_BLOCKS = ((4, 1), (16, 16))
DEFAULT_AMOUNTS = tuple(round(0.1 * i, 1) for i in range(1, 10))
CLASSIFIER_NAMES = r"(^|\.)(classifier|head|heads)(\.|$)"


Point = tuple[str, str | None, tuple[int, int] | None, float]


def _points(methods: Sequence[str], amounts: Sequence[float],
            blocks: Sequence[tuple[int, int]] = DEFAULT_BLOCKS) -> list[Point]:
    """(method, pattern, block, amount) for every evaluation: N:M methods add one 2:4 point,
    ``block`` sweeps the amounts once per block shape."""
    points: list[Point] = []
    for method in methods:
        if method == "nm":
            points.append((method, "2:4", None, 0.5))
            continue
        if method == "block":
            points += [(method, None, tuple(b), a) for b in blocks for a in amounts]
            continue
        points += [(method, None, None, a) for a in amounts]
        if method in CALIBRATED:
            points.append((method, "2:4", None, 0.5))
    return points


def _prune(model: nn.Module, method: str, pattern: str | None, block: tuple[int, int] | None, amount: float,
           scope: str, calibration: list[torch.Tensor], exclude: Sequence[str], seed: int) -> MaskSet:
    kw: dict[str, Any] = {"exclude": tuple(exclude), "seed": seed}
    # As the seed: every layer but LayerNorm (the patch-embedding conv included). Wanda, N:M
    # and SparseGPT score Linear inputs/rows, so they prune the Linears; block masks are for
    # BSR, which converts Linears, so block prunes the Linears too.
    kw["include"] = (nn.Linear,) if method in ("nm", "block", *CALIBRATED) else (nn.Linear, nn.Conv2d)
    if method in CALIBRATED:
        kw["calibration"] = calibration
    if block is not None:
        kw["block"] = block
    if pattern is not None:
        kw["pattern"] = pattern
    else:
        kw["amount"] = amount
        if method in (*SEED_METHODS, "block") or scope == "global":
            kw["scope"] = scope if method not in CALIBRATED else "local"
    if method in ("random_structured", "ln_structured"):
        kw["dim"] = 0
        # as the seed, the classifier is pruned too unless keep_classifier (then `exclude` has it)
        kw["include_classifier"] = True
    return prune(model, method, **kw)


def _iterative(model, method, pattern, block, amount, rounds, epochs, train_data, **kw):
    """Prune in ``rounds`` steps of equal kept fraction, finetuning after each; masks stacked."""
    masks, seconds = None, 0.0
    for r in range(1, rounds + 1):
        step = 1 - (1 - amount) ** (r / rounds) if pattern is None else amount
        new = _prune(model, method, pattern, block, step, **kw)
        masks = new if masks is None else masks & new
        seconds += train(model, train_data, epochs, masks=masks, desc=f"round {r}/{rounds}")
    return masks, seconds


def run_study(model: nn.Module, train_data: Dataset | None, test_data: Dataset, *,
              model_name: str, data_name: str, methods: Sequence[str] = DEFAULT_METHODS,
              amounts: Sequence[float] = DEFAULT_AMOUNTS, scope: str = "local",
              finetune_epochs: int = 0, finetune_amounts: Sequence[float] = (0.5,), iterative: int = 1,
              keep_classifier: bool = False, seed: int = 0, progress: bool = True,
              blocks: Sequence[tuple[int, int]] = DEFAULT_BLOCKS) -> list[dict[str, Any]]:
    """Prune ``model`` (never modified) with each method at each amount and evaluate.

    Method ``block`` is evaluated at every amount for each shape in ``blocks``.

    Points whose amount is in ``finetune_amounts`` (and the 2:4 points when 0.5 is) are also
    finetuned ``finetune_epochs`` epochs on ``train_data`` with the pruned weights held at zero;
    ``iterative > 1`` reaches those points in that many prune+finetune rounds instead.
    Raises ``ValueError`` for unknown methods, bad amounts, blocks or scope, finetuning without
    training data, or ``iterative < 1``.
    """
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise ValueError(f"methods: unknown {unknown}; allowed: {', '.join(METHODS)}")
    blocks = [check_block(b) for b in blocks]
    if "block" in methods and not blocks:
        raise ValueError("blocks: method 'block' needs at least one block shape, e.g. [(4, 1)]")
    for a in (*amounts, *finetune_amounts):
        check_amount(a)
        if not isinstance(a, float):
            raise ValueError(f"amounts must be fractions in [0, 1], got {a!r}")
    if scope not in ("local", "global"):
        raise ValueError(f"scope must be 'local' or 'global', got {scope!r}")
    if not isinstance(iterative, int) or iterative < 1:
        raise ValueError(f"iterative must be an int >= 1, got {iterative!r}")
    if (finetune_epochs > 0 or iterative > 1) and train_data is None:
        raise ValueError("finetuning needs training data (imagefolder: PATH/train and PATH/val)")
    calib_loader = DataLoader(train_data if train_data is not None else test_data, batch_size=64,
                              shuffle=True, generator=torch.Generator().manual_seed(seed))
    calibration = [x for _, (x, _) in zip(range(4), calib_loader, strict=False)]
    dense_acc = evaluate(model, test_data)
    exclude = (CLASSIFIER_NAMES,) if keep_classifier else ()
    common = {"model": model_name, "data": data_name, "scope": scope, "dense_accuracy": dense_acc}
    prune_kw = {"scope": scope, "calibration": calibration, "exclude": exclude, "seed": seed}
    rows = []
    points = _points(methods, amounts, blocks)
    for method, pattern, block, amount in tqdm(points, desc="accuracy", disable=not progress):
        t0 = time.perf_counter()
        masks = _prune(model, method, pattern, block, amount, **prune_kw)
        prune_s = time.perf_counter() - t0
        pruned = masks.apply(copy.deepcopy(model))
        base = {**common, "method": method, "pattern": pattern, "block": list(block) if block else None,
                "amount": amount, "prune_s": prune_s}
        rows.append({**base, "sparsity": masks.sparsity(), "accuracy": evaluate(pruned, test_data),
                     "finetuned": False, "epochs": 0, "iterative": 1, "finetune_s": 0.0})
        wanted = any(math.isclose(amount, a) for a in finetune_amounts)
        if wanted and (finetune_epochs > 0 or iterative > 1):
            tuned = copy.deepcopy(model)
            if iterative > 1:
                masks, seconds = _iterative(tuned, method, pattern, block, amount, iterative, finetune_epochs,
                                            train_data, **prune_kw)
            else:
                seconds = train(tuned, train_data, finetune_epochs, masks=masks, desc="finetune")
            rows.append({**base, "sparsity": masks.sparsity(), "accuracy": evaluate(tuned, test_data),
                         "finetuned": True, "epochs": finetune_epochs, "iterative": iterative,
                         "finetune_s": seconds})
    return rows


def _panel(row: dict[str, Any]) -> str:
    """A method's curve: ``block`` has one per block shape (``"block 4x1"``)."""
    block = row.get("block")
    return row["method"] + (f" {block[0]}x{block[1]}" if block else "")


def _label(row: dict[str, Any]) -> str:
    return _panel(row) + (f" {row['pattern']}" if row["pattern"] else "")


def markdown(rows: Sequence[dict[str, Any]]) -> str:
    """Accuracy (%) per method and amount: one-shot, and finetuned where measured."""
    dense = rows[0]["dense_accuracy"] if rows else float("nan")
    lines = [f"Dense accuracy: {100 * dense:.1f}%", "",
             "| method | amount | sparsity | accuracy | finetuned (epochs, rounds) |", "|---|---|---|---|---|"]
    tuned = {(_label(r), r["amount"]): r for r in rows if r["finetuned"]}
    for r in rows:
        if r["finetuned"]:
            continue
        t = tuned.get((_label(r), r["amount"]))
        ft = f"{100 * t['accuracy']:.1f}% ({t['epochs']}, {t['iterative']})" if t else ""
        lines.append(f"| {_label(r)} | {r['amount']:.2f} | {r['sparsity']:.3f} | {100 * r['accuracy']:.1f}% | {ft} |")
    return "\n".join(lines) + "\n"


def plot(rows: Sequence[dict[str, Any]], path: str | Path) -> bool:
    """One panel per method (the seed's four first): accuracy vs amount. False without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    methods = list(dict.fromkeys(_panel(r) for r in rows))
    cols = 2 if len(methods) <= 4 else 3
    nrows = math.ceil(len(methods) / cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(4.5 * cols, 3.4 * nrows), squeeze=False)
    for ax, method in zip(axes.flat, methods, strict=False):
        mine = [r for r in rows if _panel(r) == method]
        sweep = [r for r in mine if not r["finetuned"] and not r["pattern"]]
        if sweep:
            ax.plot([r["amount"] for r in sweep], [100 * r["accuracy"] for r in sweep], "o-", label="one-shot")
        for r in mine:
            if r["pattern"] and not r["finetuned"]:
                ax.plot(r["amount"], 100 * r["accuracy"], "s", color="C2", label=f"{r['pattern']} one-shot")
            if r["finetuned"]:
                ax.plot(r["amount"], 100 * r["accuracy"], "*", ms=12, color="C3",
                        label=f"{r['pattern'] or ''} finetuned".strip())
        ax.axhline(100 * mine[0]["dense_accuracy"], ls="--", color="gray", label="dense")
        ax.set(title=method, xlabel="pruning ratio", ylabel="top-1 accuracy (%)", xlim=(0, 1), ylim=(0, 102))
        ax.legend(fontsize=7, loc="lower left")
    for ax in list(axes.flat)[len(methods):]:
        ax.axis("off")
    fig.tight_layout()
    atomic.save_figure(fig, path, dpi=110)
    plt.close(fig)
    return True


def write_study(rows: Sequence[dict[str, Any]], out: str | Path) -> list[Path]:
    """Write accuracy.json, accuracy.md and (with matplotlib) accuracy.png; return the paths."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / "accuracy.json", out / "accuracy.md"]
    atomic.write_text(paths[0], json.dumps(list(rows), indent=1))  # crash-safe, as every output
    atomic.write_text(paths[1], markdown(rows))
    if plot(rows, out / "accuracy.png"):
        paths.append(out / "accuracy.png")
    return paths
