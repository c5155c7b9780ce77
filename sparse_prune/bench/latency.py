"""Latency of converted ViTs against the dense model: the grid behind ``sparse-prune bench``.

For each point (batch, format, backend, sparsity) the model is pruned with the method natural
for the format, converted, **checked against the masked dense model**, then timed against the
dense model interleaved in one process (:func:`~sparse_prune.timing.time_interleaved`).
``kind="layer"`` rows time single ``Linear`` shapes of the model the same way.
"""

from __future__ import annotations

import copy
import json
import math
import platform
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from sparse_prune.backends import resolve_backend
from sparse_prune.bench.train import logits_of
from sparse_prune.constants import BACKENDS, DEFAULT_BSR_BLOCK
from sparse_prune.convert import CONVERT_FORMATS, convert
from sparse_prune.masks import MaskSet
from sparse_prune.nn import SparseLinear
from sparse_prune.pruning import collect_targets, prune
from sparse_prune.report import report
from sparse_prune.timing import describe_device, git_commit, time_interleaved

ROW_KEYS = ("kind", "model", "device", "dtype", "batch", "format", "backend", "sparsity", "dense_ms",
            "sparse_ms", "speedup", "bytes", "dense_bytes", "torch", "triton", "commit")
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
BSR_BLOCK = DEFAULT_BSR_BLOCK
CLASSIFIER = r"(^|\.)(classifier|head|heads)(\.|$)"


def block_masks(model: nn.Module, sparsity: float, block: tuple[int, int] = BSR_BLOCK,
                exclude: Sequence[str] = ()) -> MaskSet:
    """Block-aligned magnitude masks: per Linear, keep the ``1 - sparsity`` share of
    ``block`` tiles (zero-padded at the edges) with the largest L1 norm, whole."""
    bm, bk = block
    out = {}
    for target in collect_targets(model, exclude=tuple(exclude)):
        name, w = target.param, target.weight
        n, k = w.shape
        padded = torch.nn.functional.pad(w.abs().float(), (0, -k % bk, 0, -n % bm))
        norms = padded.reshape(padded.shape[0] // bm, bm, -1, bk).sum((1, 3))
        drop = round(sparsity * norms.numel())
        keep = torch.ones(norms.numel(), dtype=torch.bool)
        if drop:
            keep[norms.flatten().argsort(stable=True)[:drop]] = False
        grid = keep.reshape(norms.shape).repeat_interleave(bm, 0).repeat_interleave(bk, 1)
        out[name] = grid[:n, :k].to(w.device).contiguous()
    return MaskSet(out, info={"method": "block_l1", "amount": sparsity, "block": list(block)})


def natural_masks(model: nn.Module, fmt: str, sparsity: float, exclude: Sequence[str] = (CLASSIFIER,)) -> MaskSet:
    """The pruning a user would pair with ``fmt``: coupled structured for shrink, 2:4 for
    ``2:4``, block magnitude for bsr, L1 unstructured for csr and dense."""
    if fmt == "shrink":
        return prune(model, "ln_structured", amount=sparsity, coupled=True, exclude=tuple(exclude))
    if fmt == "2:4":
        return prune(model, "nm", pattern="2:4", exclude=tuple(exclude))
    if fmt == "bsr":
        return block_masks(model, sparsity, BSR_BLOCK, exclude)
    return prune(model, "l1_unstructured", amount=sparsity, exclude=tuple(exclude))


def _weight_bytes(model: nn.Module) -> int:
    return sum(r["bytes"] for r in report(model))


def _graphed(fn: Callable[[], Any], device: torch.device) -> Callable[[], Any]:
    """Capture ``fn`` in a CUDA graph (after a side-stream warm-up) and return its replay."""
    if device.type != "cuda":
        return fn
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph.replay


def _runner(model: nn.Module, x: torch.Tensor, compile_: bool, graphs: bool) -> Callable[[], Any]:
    target = torch.compile(model) if compile_ else model

    def run():
        with torch.inference_mode():
            return target(x)

    return _graphed(run, x.device) if graphs else run


def _tolerance(dtype: torch.dtype) -> float:
    return {torch.float32: 1e-3, torch.float16: 2e-2, torch.bfloat16: 5e-2}[dtype]


def _check_close(got: torch.Tensor, want: torch.Tensor, dtype: torch.dtype, what: str) -> float:
    err = (got.float() - want.float()).abs().max().item()
    scale = max(1.0, want.float().abs().max().item())
    if not math.isfinite(err) or err > _tolerance(dtype) * scale:
        raise RuntimeError(f"{what}: converted output differs from the masked dense model by {err:.3g}")
    return err


def _common(model_name: str, device: torch.device, dtype: torch.dtype) -> dict[str, Any]:
    import triton

    return {"model": model_name, "device": describe_device(device), "dtype": str(dtype).removeprefix("torch."),
            "torch": torch.__version__, "triton": triton.__version__, "commit": git_commit(),
            "python": platform.python_version()}


def points(formats: Sequence[str], backends: Sequence[str], sparsities: Sequence[float]) -> list[tuple]:
    """(format, backend, sparsity) of the grid; 2:4 has one sparsity (0.5)."""
    out = []
    for fmt in formats:
        if fmt not in CONVERT_FORMATS:
            raise ValueError(f"formats: unknown {fmt!r}; allowed: {', '.join(CONVERT_FORMATS)}")
        # dense runs torch's GEMM under every backend, and coupled shrink leaves plain Linears
        for backend in (["torch"] if fmt in ("dense", "shrink") else backends):
            if backend not in BACKENDS:
                raise ValueError(f"backends: unknown {backend!r}; allowed: {', '.join(BACKENDS)}")
            for s in ([0.5] if fmt == "2:4" else sparsities):
                if not 0.0 <= s < 1.0:
                    raise ValueError(f"sparsity must lie in [0, 1), got {s}")
                out.append((fmt, backend, s))
    return list(dict.fromkeys(out))


def bench_e2e(model: nn.Module, model_name: str, image_size: int, *, formats: Sequence[str],
              backends: Sequence[str], sparsities: Sequence[float], batches: Sequence[int],
              dtype: torch.dtype = torch.float32, device: str = "cpu", compile_: bool = False,
              cuda_graphs: bool = False, reps: int = 5, warmup: int = 2, progress: bool = True,
              skipped: list[str] | None = None) -> list[dict[str, Any]]:
    """End-to-end rows (``kind="e2e"``) for every batch × (format, backend, sparsity)."""
    dev = torch.device(device)
    model = copy.deepcopy(model).to(device=dev, dtype=dtype).eval()
    common = _common(model_name, dev, dtype)
    dense_bytes = _weight_bytes(model)
    grid = points(formats, backends, sparsities)
    rows = []
    masks_cache: dict[tuple[str, float], MaskSet] = {}
    converted: dict[tuple[str, str, float], nn.Module] = {}
    bar = tqdm(total=len(grid) * len(batches), desc="bench e2e", disable=not progress)
    try:  # Ctrl-C (or `timeout -s INT`) keeps the rows measured so far
        for batch in batches:
            x = torch.randn(batch, 3, image_size, image_size, generator=torch.Generator().manual_seed(batch))
            x = x.to(device=dev, dtype=dtype)
            dense_run = _runner(model, x, compile_, cuda_graphs)
            for fmt, backend, s in grid:
                bar.update()
                key = (fmt, 0.5 if fmt == "2:4" else s)
                if key not in masks_cache:
                    masks_cache[key] = natural_masks(model, fmt, key[1])
                masks = masks_cache[key]
                sparse = converted.get((fmt, backend, s))
                try:
                    if sparse is None:
                        with warnings.catch_warnings():
                            warnings.simplefilter("ignore")  # layers left dense are visible in the bytes
                            sparse = convert(model, masks, format=fmt, backend=backend,
                                             **({"block": BSR_BLOCK} if fmt == "bsr" else {}))
                except ValueError as exc:  # e.g. triton where it cannot run
                    if skipped is not None:
                        skipped.append(f"{fmt}/{backend}: {exc}")
                    continue
                converted[(fmt, backend, s)] = sparse
                try:
                    with torch.inference_mode():
                        want = logits_of(masks.apply(copy.deepcopy(model))(x))
                        _check_close(logits_of(sparse(x)), want, dtype, f"{fmt}/{backend}/{s} batch {batch}")
                except RuntimeError as exc:  # a wrong kernel is reported, never timed
                    if skipped is None:
                        raise
                    skipped.append(f"WRONG RESULT, not timed: {exc}")
                    continue
                try:
                    ms = time_interleaved({"dense": dense_run, "sparse": _runner(sparse, x, compile_, cuda_graphs)},
                                          dev, warmup=warmup, reps=reps)
                except RuntimeError as exc:  # e.g. a host sync inside CUDA-graph capture (torch backend)
                    if skipped is not None:
                        skipped.append(f"{fmt}/{backend}/{s} batch {batch}: {type(exc).__name__}: {str(exc)[:200]}")
                    continue
                used = sorted({m.backend for m in sparse.modules() if isinstance(m, SparseLinear)}) or ["torch"]
                rows.append({"kind": "e2e", **common, "batch": batch, "format": fmt, "backend": "+".join(used),
                             "sparsity": masks.sparsity(), "dense_ms": ms["dense"], "sparse_ms": ms["sparse"],
                             "speedup": ms["dense"] / ms["sparse"], "bytes": _weight_bytes(sparse),
                             "dense_bytes": dense_bytes, "compile": compile_, "cuda_graphs": cuda_graphs})
    except KeyboardInterrupt:
        if skipped is not None:
            skipped.append("interrupted: the rows above are partial")
    bar.close()
    return rows


def linear_shapes(model: nn.Module) -> list[tuple[int, int]]:
    """Distinct (out_features, in_features) of the model's Linears, classifier excluded."""
    import re

    shapes = [tuple(m.weight.shape) for name, m in model.named_modules()
              if isinstance(m, nn.Linear) and not re.search(CLASSIFIER, name)]
    return list(dict.fromkeys(shapes))


def bench_layers(shapes: Sequence[tuple[int, int]], model_name: str, tokens: int, *, formats: Sequence[str],
                 backends: Sequence[str], sparsities: Sequence[float], batches: Sequence[int],
                 dtype: torch.dtype = torch.float32, device: str = "cpu", reps: int = 10, warmup: int = 3,
                 progress: bool = True, skipped: list[str] | None = None) -> list[dict[str, Any]]:
    """Per-GEMM rows (``kind="layer"``): ``nn.Linear`` vs each format on ``[batch·tokens, K]``."""
    dev = torch.device(device)
    common = _common(model_name, dev, dtype)
    grid = points(formats, backends, sparsities)
    rows = []
    bar = tqdm(total=len(shapes) * len(grid) * len(batches), desc="bench layers", disable=not progress)
    try:  # Ctrl-C (or `timeout -s INT`) keeps the rows measured so far
        for n, k in shapes:
            torch.manual_seed(n * 7 + k)
            dense = nn.Linear(k, n).to(device=dev, dtype=dtype).eval()
            holder = nn.Sequential(dense)
            for batch in batches:
                x = torch.randn(batch * tokens, k, device=dev, dtype=dtype)
                for fmt, backend, s in grid:
                    bar.update()
                    masks = natural_masks(holder, fmt, s, exclude=())
                    try:
                        with warnings.catch_warnings():
                            warnings.simplefilter("ignore")
                            layer = convert(holder, masks, format=fmt, backend=backend,
                                            **({"block": BSR_BLOCK} if fmt == "bsr" else {}))[0]
                    except ValueError as exc:
                        if skipped is not None:
                            skipped.append(f"layer {n}x{k} {fmt}/{backend}: {exc}")
                        continue
                    try:
                        with torch.inference_mode():
                            want = masks.apply(copy.deepcopy(holder))(x)
                            _check_close(layer(x), want, dtype, f"layer {n}x{k} {fmt}/{backend}")
                    except RuntimeError as exc:  # a wrong kernel is reported, never timed
                        if skipped is None:
                            raise
                        skipped.append(f"WRONG RESULT, not timed: {exc}")
                        continue
                    ms = time_interleaved({"dense": lambda d=dense, x=x: d(x), "sparse": lambda s=layer, x=x: s(x)},
                                          dev, warmup=warmup, reps=reps)
                    fmt_bytes = sum(r["bytes"] for r in report(nn.Sequential(layer)))
                    rows.append({"kind": "layer", **common, "shape": [n, k], "batch": batch, "format": fmt,
                                 "backend": getattr(layer, "backend", "torch"), "sparsity": masks.sparsity(),
                                 "dense_ms": ms["dense"], "sparse_ms": ms["sparse"],
                                 "speedup": ms["dense"] / ms["sparse"], "bytes": fmt_bytes,
                                 "dense_bytes": n * k * dense.weight.element_size()})
    except KeyboardInterrupt:
        if skipped is not None:
            skipped.append("interrupted: the rows above are partial")
    bar.close()
    return rows


def markdown(rows: Sequence[dict[str, Any]]) -> str:
    """Tables of the rows: end to end first, then per layer."""
    out = []
    e2e = [r for r in rows if r["kind"] == "e2e"]
    if e2e:
        r0 = e2e[0]
        out += [f"End to end: {r0['model']}, {r0['dtype']}, {r0['device']}, torch {r0['torch']}, "
                f"triton {r0['triton']}, commit {r0['commit']}.", "",
                "| batch | format | backend | sparsity | dense ms | sparse ms | speedup | MB (sparse / dense) |",
                "|---|---|---|---|---|---|---|---|"]
        out += [f"| {r['batch']} | {r['format']} | {r['backend']} | {r['sparsity']:.2f} | {r['dense_ms']:.2f} | "
                f"{r['sparse_ms']:.2f} | {r['speedup']:.2f}x | {r['bytes'] / 1e6:.1f} / {r['dense_bytes'] / 1e6:.1f} |"
                for r in e2e]
        out.append("")
    layers = [r for r in rows if r["kind"] == "layer"]
    if layers:
        out += ["Per layer (`[batch·tokens, K] x [K, N]`):", "",
                "| N x K | batch | format | backend | sparsity | dense ms | sparse ms | speedup |",
                "|---|---|---|---|---|---|---|---|"]
        out += [f"| {r['shape'][0]}x{r['shape'][1]} | {r['batch']} | {r['format']} | {r['backend']} | "
                f"{r['sparsity']:.2f} | {r['dense_ms']:.3f} | {r['sparse_ms']:.3f} | {r['speedup']:.2f}x |"
                for r in layers]
    return "\n".join(out) + "\n"


def plot(rows: Sequence[dict[str, Any]], out: Path) -> list[Path]:
    """speedup.png (speedup vs sparsity, one line per format/backend and batch) and memory.png."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    e2e = [r for r in rows if r["kind"] == "e2e"] or list(rows)
    paths = []
    fig, ax = plt.subplots(figsize=(7, 4.5))
    lines: dict[tuple, list] = {}
    for r in e2e:
        lines.setdefault((r["format"], r["backend"], r["batch"]), []).append((r["sparsity"], r["speedup"]))
    for (fmt, backend, batch), pts in sorted(lines.items()):
        pts.sort()
        ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", label=f"{fmt}/{backend} b{batch}")
    ax.axhline(1.0, ls="--", color="gray")
    ax.set(xlabel="sparsity", ylabel="speedup vs dense (x)", title="latency: dense ms / sparse ms")
    ax.legend(fontsize=7)
    fig.tight_layout()
    paths.append(out / "speedup.png")
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    seen = {}
    for r in e2e:
        seen.setdefault(f"{r['format']} {r['sparsity']:.2f}", r["bytes"] / 1e6)
    if e2e:
        ax.bar(["dense", *seen], [e2e[0]["dense_bytes"] / 1e6, *seen.values()])
    ax.set(ylabel="weight MB", title="weight memory per format")
    ax.tick_params(axis="x", rotation=45, labelsize=7)
    fig.tight_layout()
    paths.append(out / "memory.png")
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)
    return paths


def write_latency(rows: Sequence[dict[str, Any]], out: str | Path) -> list[Path]:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "latency.json").write_text(json.dumps(list(rows), indent=1))
    (out / "latency.md").write_text(markdown(rows))
    return [out / "latency.json", out / "latency.md", *plot(rows, out)]


__all__ = ["ROW_KEYS", "bench_e2e", "bench_layers", "block_masks", "linear_shapes", "markdown", "natural_masks",
           "plot", "points", "resolve_backend", "write_latency"]
