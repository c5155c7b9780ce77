"""Latency of converted ViTs against the dense model: the grid behind ``sparse-prune bench``.

For each point (batch, format, backend, sparsity) the model is pruned with the method natural
for the format and converted. The masked dense model in the bench dtype (same ``compile`` /
CUDA-graph setting) is the dense side; the converted model is the sparse side. The first output
of each side's runner is checked with :func:`sparse_prune.agreement.check_matches` against the
masked dense model run in float64 (the dense side's error sets the allowance); the same runner
objects are then timed in rotating rounds (:func:`~sparse_prune.timing.time_samples`).
``kind="layer"`` rows do the same for single ``Linear`` shapes of the model.

Every grid point gives one row, whose ``status`` says what happened:

- ``"ok"``: checked and timed (``dense_ms``/``sparse_ms`` medians with ``*_q1``/``*_q3``);
- ``"wrong"``: the converted output disagrees with the masked dense model (``reason`` and the
  error figures; never timed);
- ``"failed"``: converting, running, compiling or timing the converted model (or running its
  dense side) raised something other than a refusal;
- ``"skipped"``: ``convert`` refused the point (``ValueError``, e.g. triton where it cannot run)
  or a CUDA graph could not capture it; ``reason`` says why.

:func:`bad_rows` lists the wrong and failed ones; ``sparse-prune bench`` exits 1 when any exist.
"""

from __future__ import annotations

import copy
import json
import platform
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from sparse_prune import atomic
from sparse_prune.agreement import (
    Mismatch,
    allowed_error,
    check_matches,
    reference_dtype,
    relative_error,
)
from sparse_prune.attention import attention_implementation
from sparse_prune.backends import resolve_backend
from sparse_prune.bench.train import logits_of
from sparse_prune.constants import BACKEND_FORMATS, BACKENDS, DEFAULT_BSR_BLOCK
from sparse_prune.convert import CONVERT_FORMATS, convert
from sparse_prune.masks import MaskSet
from sparse_prune.nn import SparseLinear
from sparse_prune.pruning import prune
from sparse_prune.report import report
from sparse_prune.timing import describe_device, git_commit, spread, time_samples

ROW_KEYS = ("kind", "model", "device", "dtype", "batch", "format", "block", "backend", "sparsity", "status", "reason",
            "dense_ms", "dense_q1", "dense_q3", "sparse_ms", "sparse_q1", "sparse_q3", "speedup", "reps",
            "error", "baseline_error", "allowed", "converted_layers", "dense_layers", "warning", "bytes",
            "dense_bytes", "attention", "torch", "triton", "commit")
STATUSES = ("wrong", "failed", "ok", "skipped")  # also the order of the tables: the bad news first
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
BSR_BLOCK = DEFAULT_BSR_BLOCK
CLASSIFIER = r"(^|\.)(classifier|head|heads)(\.|$)"


def block_masks(model: nn.Module, sparsity: float, block: tuple[int, int] = BSR_BLOCK,
                exclude: Sequence[str] = ()) -> MaskSet:
    """Block-aligned magnitude masks for bsr: ``sp.prune(model, "block", ...)`` (L2 block
    score, ``sparsity`` of each Linear's ``block`` tiles pruned whole). Kept as a name for
    the scripts that import it; the method itself lives in :mod:`sparse_prune.pruning`."""
    return prune(model, "block", amount=sparsity, block=block, exclude=tuple(exclude))


def random_linear(out_features: int, in_features: int, gen: torch.Generator) -> nn.Linear:
    """A float32 ``nn.Linear(in_features, out_features)`` without gradients, drawn from ``gen``:
    weights N(0, 1/in_features) (unit-scale outputs for unit-scale inputs), bias N(0, 0.1²)
    (the per-GEMM benchmarks' layers)."""
    lin = nn.Linear(in_features, out_features)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(out_features, in_features, generator=gen) * in_features ** -0.5)
        lin.bias.copy_(torch.randn(out_features, generator=gen) * 0.1)
    return lin.requires_grad_(False)


def natural_masks(model: nn.Module, fmt: str, sparsity: float, exclude: Sequence[str] = (CLASSIFIER,),
                  block: tuple[int, int] = BSR_BLOCK) -> MaskSet:
    """The pruning a user would pair with ``fmt``: coupled structured for shrink, 2:4 for
    ``2:4``, ``block`` magnitude for bsr, L1 unstructured for csr and dense."""
    if fmt == "shrink":
        return prune(model, "ln_structured", amount=sparsity, coupled=True, exclude=tuple(exclude))
    if fmt == "2:4":
        return prune(model, "nm", pattern="2:4", exclude=tuple(exclude))
    if fmt == "bsr":
        return block_masks(model, sparsity, block, exclude)
    return prune(model, "l1_unstructured", amount=sparsity, exclude=tuple(exclude))


def mask_kind(fmt: str) -> str:
    """Which :func:`natural_masks` pruning ``fmt`` uses: formats with the same kind share masks
    (``dense`` and ``csr`` both take L1 unstructured), hence one masked dense side."""
    return {"shrink": "coupled_l2", "2:4": "2:4", "bsr": "block"}.get(fmt, "l1")


def _weight_bytes(model: nn.Module) -> int:
    return sum(r["bytes"] for r in report(model))


def layer_counts(converted: nn.Module, masks: MaskSet) -> tuple[int, int]:
    """(converted, left dense) among the masked weights of ``masks``: a weight counts as
    converted when its module became a ``SparseLinear`` or was cut by dependency-aware
    ``shrink``; every other masked weight (``convert`` warned about it) was left dense."""
    kinds = {r["name"]: r["format"] for r in report(converted)}
    done = sum(kinds.get(name.rpartition(".")[0], "nn.Linear") != "nn.Linear" for name in masks)
    return done, len(masks) - done


def _convert(model: nn.Module, masks: MaskSet, fmt: str, backend: str,
             example_inputs: Any = None, block: tuple[int, int] = BSR_BLOCK) -> tuple[nn.Module, str | None]:
    """``convert`` with its warnings shown as usual and their text returned for the row;
    ``format="auto"`` measures its per-layer choice on ``example_inputs`` (the batch timed)."""
    kw: dict[str, Any] = {"block": tuple(block)} if fmt == "bsr" else {}
    if fmt == "auto":
        kw["example_inputs"] = example_inputs
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = convert(model, masks, format=fmt, backend=backend, **kw)
    for w in caught:  # re-issued under the caller's filters: nothing is hidden
        warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    return out, "; ".join(str(w.message) for w in caught) or None


class CaptureError(RuntimeError):
    """CUDA-graph capture of a runner failed (e.g. a host sync in the torch reference ops)."""


def _graphed(fn: Callable[[], Any], device: torch.device) -> Callable[[], Any]:
    """Capture ``out = fn()`` in a CUDA graph (after a side-stream warm-up); the returned
    callable replays the graph and returns that static ``out``, so the output checked is the
    output of what is timed. Capture failures raise :class:`CaptureError`."""
    if device.type != "cuda":
        return fn
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    try:
        with torch.cuda.graph(graph):
            out = fn()
    except Exception as exc:  # noqa: BLE001 - reported in the row
        raise CaptureError(f"cannot be captured in a CUDA graph: {type(exc).__name__}: {str(exc)[:300]}") from exc

    def replay() -> Any:
        graph.replay()
        return out

    replay.graph = graph  # keeps the graph (and its memory pool) alive with the runner
    return replay


def _runner(model: nn.Module, x: torch.Tensor, compile_: bool, graphs: bool) -> Callable[[], Any]:
    """The callable that is both checked (its first output) and timed."""
    target = torch.compile(model) if compile_ else model

    def run():
        with torch.inference_mode():
            return target(x)

    return _graphed(run, x.device) if graphs else run


def _agreement(got: torch.Tensor, reference: torch.Tensor, baseline: torch.Tensor,
               what: str) -> tuple[dict[str, Any], str | None]:
    """The error figures of :func:`check_matches` and its message when ``got`` is wrong."""
    try:
        return check_matches(got, reference, baseline, what), None
    except Mismatch as exc:
        base = relative_error(baseline, reference)
        return {"error": relative_error(got, reference), "baseline_error": base,
                "allowed": allowed_error(got.dtype, base)}, str(exc)


def _timed(samples: dict[str, list[float]], reps: int) -> dict[str, Any]:
    d, s = spread(samples["dense"]), spread(samples["sparse"])
    return {"dense_ms": d["median"], "dense_q1": d["q1"], "dense_q3": d["q3"], "sparse_ms": s["median"],
            "sparse_q1": s["q1"], "sparse_q3": s["q3"], "speedup": d["median"] / s["median"], "reps": reps}


def _failure(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {str(exc)[:300]}"


def _common(model_name: str, device: torch.device, dtype: torch.dtype) -> dict[str, Any]:
    import triton

    return {"model": model_name, "device": describe_device(device), "dtype": str(dtype).removeprefix("torch."),
            "torch": torch.__version__, "triton": triton.__version__, "commit": git_commit(),
            "python": platform.python_version()}


def _blank(**fields: Any) -> dict[str, Any]:
    """A row with every key of ``ROW_KEYS`` (``None`` where not measured) updated by ``fields``."""
    return {**dict.fromkeys(ROW_KEYS), **fields}


def bad_rows(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """The rows whose status is ``"wrong"`` or ``"failed"``: a run with any must not pass."""
    return [r for r in rows if r.get("status") in ("wrong", "failed")]


# "auto": per layer the fastest measured on the batch timed, dense included (L1 masks)
BENCH_FORMATS = (*CONVERT_FORMATS, "auto")


def points(formats: Sequence[str], backends: Sequence[str], sparsities: Sequence[float]) -> list[tuple]:
    """(format, backend, sparsity) of the grid; 2:4 has one sparsity (0.5)."""
    out = []
    for fmt in formats:
        if fmt not in BENCH_FORMATS:
            raise ValueError(f"formats: unknown {fmt!r}; allowed: {', '.join(BENCH_FORMATS)}")
        # dense runs torch's GEMM under every backend, coupled shrink leaves plain Linears, and
        # auto picks among every backend itself
        fixed = {"dense": ["torch"], "shrink": ["torch"], "auto": ["auto"]}
        for backend in fixed.get(fmt, backends):
            if backend not in BACKENDS:
                raise ValueError(f"backends: unknown {backend!r}; allowed: {', '.join(BACKENDS)}")
            if fmt not in BACKEND_FORMATS.get(backend, (fmt,)):
                continue  # e.g. cuSPARSELt has no CSR: not a point, not even a skipped one
            for s in ([0.5] if fmt == "2:4" else sparsities):
                if not 0.0 <= s < 1.0:
                    raise ValueError(f"sparsity must lie in [0, 1), got {s}")
                out.append((fmt, backend, s))
    return list(dict.fromkeys(out))


def _by_masks(grid: Sequence[tuple]) -> dict[tuple[str, float], list[tuple[int, tuple]]]:
    """Grid points (with their grid index) grouped by the masks they use, in grid order."""
    groups: dict[tuple[str, float], list[tuple[int, tuple]]] = {}
    for i, (fmt, backend, s) in enumerate(grid):
        groups.setdefault((mask_kind(fmt), 0.5 if fmt == "2:4" else s), []).append((i, (fmt, backend, s)))
    return groups


def bench_e2e(model: nn.Module, model_name: str, image_size: int, *, formats: Sequence[str],
              backends: Sequence[str], sparsities: Sequence[float], batches: Sequence[int],
              dtype: torch.dtype = torch.float32, device: str = "cpu", compile_: bool = False,
              cuda_graphs: bool = False, reps: int = 5, warmup: int = 2, progress: bool = True,
              notes: list[str] | None = None, bsr_block: tuple[int, int] = BSR_BLOCK) -> list[dict[str, Any]]:
    """End-to-end rows (``kind="e2e"``), one per batch × (format, backend, sparsity), in grid
    order; see the module docstring for ``status``. ``bsr`` points keep whole ``bsr_block``
    blocks (the row's ``block``). A Ctrl-C (or ``timeout -s INT``) keeps the rows so far and
    appends a line to ``notes``."""
    dev = torch.device(device)
    model = copy.deepcopy(model).to(device=dev, dtype=dtype).eval()
    # both sides run the model's own attention (sp.set_attention): a speedup is never attention's alone
    common = {"kind": "e2e", **_common(model_name, dev, dtype), "compile": compile_, "cuda_graphs": cuda_graphs,
              "attention": attention_implementation(model)}
    dense_bytes = _weight_bytes(model)
    grid = points(formats, backends, sparsities)
    groups = _by_masks(grid)
    masks_cache: dict[tuple[str, float], MaskSet] = {}
    converted: dict[tuple, tuple[nn.Module, str | None]] = {}  # reused by the next batch
    done: list[tuple[int, int, dict[str, Any]]] = []
    bar = tqdm(total=len(grid) * len(batches), desc="bench e2e", disable=not progress)
    try:
        for bi, batch in enumerate(batches):
            keep = bi + 1 < len(batches)
            x = torch.randn(batch, 3, image_size, image_size, generator=torch.Generator().manual_seed(batch))
            x = x.to(device=dev, dtype=dtype)
            for key, pts in groups.items():
                if key not in masks_cache:
                    masks_cache[key] = natural_masks(model, pts[0][1][0], key[1], block=bsr_block)
                masks = masks_cache[key]
                ref_dtype = reference_dtype(dev)
                ref_model = masks.apply(copy.deepcopy(model).to(ref_dtype))
                with torch.inference_mode():
                    reference = logits_of(ref_model(x.to(ref_dtype)))
                del ref_model
                dense_run, baseline, dense_fail = None, None, None
                try:  # the masked dense model under the same setting: the timed dense side and the baseline
                    dense_run = _runner(masks.apply(copy.deepcopy(model)), x, compile_, cuda_graphs)
                    baseline = logits_of(dense_run()).clone()
                except Exception as exc:  # noqa: BLE001 - every point of these masks reports it
                    dense_fail = f"the masked dense side: {_failure(exc)}"
                for i, (fmt, backend, s) in pts:
                    bar.update()
                    row = _blank(**common, batch=batch, format=fmt, backend=backend, sparsity=masks.sparsity(),
                                 dense_bytes=dense_bytes, block=list(bsr_block) if fmt == "bsr" else None)
                    done.append((bi, i, row))
                    what = f"{fmt}/{backend} sparsity {s} batch {batch}"
                    if (fmt, backend, s) in converted:
                        sparse, warning = converted[(fmt, backend, s)]
                    else:
                        try:
                            sparse, warning = _convert(model, masks, fmt, backend, x, bsr_block)
                        except ValueError as exc:  # refused up front, e.g. triton where it cannot run
                            row.update(status="skipped", reason=str(exc))
                            continue
                        except Exception as exc:  # noqa: BLE001 - a conversion that crashes is a failed row
                            row.update(status="failed", reason=f"convert: {_failure(exc)}")
                            continue
                        if keep and fmt != "auto":  # auto's choice depends on the batch: re-measured
                            converted[(fmt, backend, s)] = (sparse, warning)
                    used = sorted({m.backend for m in sparse.modules() if isinstance(m, SparseLinear)}) or ["torch"]
                    n_conv, n_dense = layer_counts(sparse, masks)
                    row.update(backend="+".join(used), converted_layers=n_conv, dense_layers=n_dense, warning=warning,
                               bytes=_weight_bytes(sparse))
                    row.update(_measure(lambda sparse=sparse, x=x: _runner(sparse, x, compile_, cuda_graphs),
                                        dense_run, baseline, dense_fail, reference, what, dev, warmup, reps))
                del dense_run, baseline, reference
    except KeyboardInterrupt:
        if notes is not None:
            notes.append("interrupted: the rows are partial")
    bar.close()  # a point cut short by an interrupt has no status yet: dropped
    return [row for _, _, row in sorted(done, key=lambda t: t[:2]) if row["status"] is not None]


def _measure(make_sparse: Callable[[], Callable[[], Any]], dense_run: Callable[[], Any] | None,
             baseline: torch.Tensor | None, dense_fail: str | None, reference: torch.Tensor, what: str,
             dev: torch.device, warmup: int, reps: int) -> dict[str, Any]:
    """Build the sparse runner, check its first output, time it against ``dense_run``: the
    row's status, reason, error figures and timings."""
    if dense_fail is not None:
        return {"status": "failed", "reason": dense_fail}
    try:
        sparse_run = make_sparse()
    except CaptureError as exc:
        return {"status": "skipped", "reason": str(exc)}
    except Exception as exc:  # noqa: BLE001 - a crash of the converted model is a failed row
        return {"status": "failed", "reason": _failure(exc)}
    try:
        got = logits_of(sparse_run()).clone()
    except Exception as exc:  # noqa: BLE001
        return {"status": "failed", "reason": _failure(exc)}
    figures, wrong = _agreement(got, reference, baseline, what)
    if wrong is not None:  # a wrong result is reported, never timed
        return {"status": "wrong", "reason": wrong, **figures}
    try:
        samples = time_samples({"dense": dense_run, "sparse": sparse_run}, dev, warmup=warmup, reps=reps)
    except Exception as exc:  # noqa: BLE001
        return {"status": "failed", "reason": f"timing: {_failure(exc)}", **figures}
    return {"status": "ok", **figures, **_timed(samples, reps)}


def linear_shapes(model: nn.Module) -> list[tuple[int, int]]:
    """Distinct (out_features, in_features) of the model's Linears, classifier excluded."""
    import re

    shapes = [tuple(m.weight.shape) for name, m in model.named_modules()
              if isinstance(m, nn.Linear) and not re.search(CLASSIFIER, name)]
    return list(dict.fromkeys(shapes))


def bench_layers(shapes: Sequence[tuple[int, int]], model_name: str, tokens: int, *, formats: Sequence[str],
                 backends: Sequence[str], sparsities: Sequence[float], batches: Sequence[int],
                 dtype: torch.dtype = torch.float32, device: str = "cpu", reps: int = 10, warmup: int = 3,
                 progress: bool = True, notes: list[str] | None = None) -> list[dict[str, Any]]:
    """Per-GEMM rows (``kind="layer"``): the masked dense ``nn.Linear`` vs each format on
    ``[batch·tokens, K]``, checked and timed like :func:`bench_e2e`."""
    dev = torch.device(device)
    common = {"kind": "layer", **_common(model_name, dev, dtype)}
    grid = points(formats, backends, sparsities)
    groups = _by_masks(grid)
    ref_dtype = reference_dtype(dev)
    rows = []
    bar = tqdm(total=len(shapes) * len(grid) * len(batches), desc="bench layers", disable=not progress)
    try:
        for n, k in shapes:
            torch.manual_seed(n * 7 + k)
            holder = nn.Sequential(nn.Linear(k, n).to(device=dev, dtype=dtype).eval())
            for batch in batches:
                x = torch.randn(batch * tokens, k, device=dev, dtype=dtype)
                for key, pts in groups.items():
                    masks = natural_masks(holder, pts[0][1][0], key[1], exclude=())
                    masked = masks.apply(copy.deepcopy(holder))[0]
                    with torch.inference_mode():
                        reference = copy.deepcopy(masked).to(ref_dtype)(x.to(ref_dtype))
                        baseline = masked(x)
                    for _, (fmt, backend, s) in pts:
                        bar.update()
                        row = _blank(**common, shape=[n, k], batch=batch, format=fmt, backend=backend,
                                     sparsity=masks.sparsity(), dense_bytes=n * k * masked.weight.element_size())
                        rows.append(row)
                        try:
                            layer, warning = _convert(holder, masks, fmt, backend, x)
                        except ValueError as exc:
                            row.update(status="skipped", reason=str(exc))
                            continue
                        except Exception as exc:  # noqa: BLE001
                            row.update(status="failed", reason=f"convert: {_failure(exc)}")
                            continue
                        n_conv, n_dense = layer_counts(layer, masks)
                        layer = layer[0]
                        row.update(backend=getattr(layer, "backend", "torch"), converted_layers=n_conv,
                                   dense_layers=n_dense, warning=warning,
                                   bytes=sum(r["bytes"] for r in report(nn.Sequential(layer))))
                        row.update(_measure(lambda layer=layer, x=x: (lambda: layer(x)),
                                            lambda masked=masked, x=x: masked(x), baseline, None, reference,
                                            f"layer {n}x{k} {fmt}/{backend} sparsity {s} batch {batch}", dev,
                                            warmup, reps))
    except KeyboardInterrupt:
        if notes is not None:
            notes.append("interrupted: the rows are partial")
    bar.close()
    return [row for row in rows if row["status"] is not None]


def _format(r: dict[str, Any]) -> str:
    block = r.get("block")
    return f"{r['format']} {block[0]}x{block[1]}" if block else r["format"]


def _ms(r: dict[str, Any], side: str, digits: int) -> str:
    if r.get(f"{side}_ms") is None:
        return "-"
    return f"{r[f'{side}_ms']:.{digits}f} ({r[f'{side}_q1']:.{digits}f}-{r[f'{side}_q3']:.{digits}f})"


def _status(r: dict[str, Any]) -> str:
    if r["status"] == "ok":
        return "ok"
    if r["status"] == "wrong" and r.get("error") is not None:
        return f"**WRONG** (error {r['error']:.2g} > {r['allowed']:.2g})"
    return f"**{r['status'].upper()}**"


def _layers(r: dict[str, Any]) -> str:
    return "-" if r.get("converted_layers") is None else f"{r['converted_layers']} / {r['dense_layers']}"


def _ordered(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Wrong rows first, then failed, then the measured ones (stable within each)."""
    rank = {s: i for i, s in enumerate(STATUSES)}
    return sorted(rows, key=lambda r: rank.get(r.get("status", "ok"), len(rank)))


def markdown(rows: Sequence[dict[str, Any]]) -> str:
    """Tables of the rows, end to end first, then per layer; in each, wrong and failed rows come
    first; times are ``median (q1-q3)`` ms; skipped points are listed under the tables.
    ``layers`` = masked weights converted / left dense."""
    out = []
    shown = [r for r in rows if r.get("status", "ok") != "skipped"]
    e2e = _ordered([r for r in shown if r["kind"] == "e2e"])
    if e2e:
        r0 = e2e[0]
        setting = ", torch.compile" * bool(r0.get("compile")) + ", CUDA graphs" * bool(r0.get("cuda_graphs"))
        out += [f"End to end: {r0['model']}, {r0['dtype']}, {r0['device']}{setting}, torch {r0['torch']}, "
                f"triton {r0['triton']}, commit {r0['commit']}; dense = the masked dense model.", "",
                "| batch | format | backend | sparsity | status | layers | dense ms (q1-q3) | sparse ms (q1-q3) "
                "| speedup | MB (sparse / dense) |",
                "|---|---|---|---|---|---|---|---|---|---|"]
        out += [f"| {r['batch']} | {_format(r)} | {r['backend']} | {r['sparsity']:.2f} | {_status(r)} | {_layers(r)} | "
                f"{_ms(r, 'dense', 2)} | {_ms(r, 'sparse', 2)} | "
                f"{'-' if r['speedup'] is None else format(r['speedup'], '.2f') + 'x'} | "
                f"{'-' if r['bytes'] is None else format(r['bytes'] / 1e6, '.1f')} / {r['dense_bytes'] / 1e6:.1f} |"
                for r in e2e]
        out.append("")
    layers = _ordered([r for r in shown if r["kind"] == "layer"])
    if layers:
        out += ["Per layer (`[batch·tokens, K] x [K, N]`; dense = the masked dense `nn.Linear`):", "",
                "| N x K | batch | format | backend | sparsity | status | dense ms (q1-q3) | sparse ms (q1-q3) "
                "| speedup |", "|---|---|---|---|---|---|---|---|---|"]
        out += [f"| {r['shape'][0]}x{r['shape'][1]} | {r['batch']} | {r['format']} | {r['backend']} | "
                f"{r['sparsity']:.2f} | {_status(r)} | {_ms(r, 'dense', 3)} | {_ms(r, 'sparse', 3)} | "
                f"{'-' if r['speedup'] is None else format(r['speedup'], '.2f') + 'x'} |" for r in layers]
        out.append("")
    bad = bad_rows(rows)
    if bad:
        out += [f"{r['status'].upper()}: {r['reason']}" for r in bad] + [""]
    skipped = [r for r in rows if r.get("status") == "skipped"]
    if skipped:
        out += [f"skipped: {r['kind']} {_where(r)}: {r['reason']}" for r in skipped]
    return "\n".join(out).rstrip("\n") + "\n"


def _where(r: dict[str, Any]) -> str:
    shape = f"{r['shape'][0]}x{r['shape'][1]} " if r.get("shape") else ""
    return f"{shape}{r['format']}/{r['backend']} sparsity {r['sparsity']:.2f} batch {r['batch']}"


def speedup_range(r: dict[str, Any]) -> tuple[float, float]:
    """The speedup's spread from the quartiles of both sides: ``dense q1 / sparse q3`` to
    ``dense q3 / sparse q1`` (the interquartile boxes' worst and best ratio)."""
    return r["dense_q1"] / r["sparse_q3"], r["dense_q3"] / r["sparse_q1"]


def _setting(rows: Sequence[dict[str, Any]]) -> str:
    """``model, dtype, device`` of the rows (every distinct value, joined)."""
    def values(key: str) -> str:
        return " / ".join(dict.fromkeys(str(r.get(key)) for r in rows))

    return f"{values('model')}, {values('dtype')}, {values('device')}"


def plot(rows: Sequence[dict[str, Any]], out: Path) -> list[Path]:
    """speedup.png and memory.png of the measured rows (end to end, else per layer).

    speedup.png: one panel per batch size; each (format, backend) is its own marker at each
    measured sparsity (the median speedup), nudged sideways so points at one sparsity do not
    hide each other, with bars over :func:`speedup_range` (the quartiles); nothing joins the
    points, as nothing was measured between them. The title names the model, dtype and device,
    each panel its batch; the dashed line is dense (1x).
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    ok = [r for r in rows if r.get("status", "ok") == "ok" and r.get("speedup") is not None]
    e2e = [r for r in ok if r["kind"] == "e2e"] or ok
    paths = []
    batches = sorted({r["batch"] for r in e2e}) or [None]
    fig, axes = plt.subplots(1, len(batches), figsize=(max(7.0, 4.2 * len(batches)), 4.8), squeeze=False,
                             sharey=True)
    series = sorted({(_format(r), r["backend"]) for r in e2e})
    markers = "osD^vP*Xh<>p"
    width = min(0.05, 0.008 * max(1, len(series) - 1))
    for ax, batch in zip(axes[0], batches, strict=True):
        for i, (fmt, backend) in enumerate(series):
            pts = sorted((r for r in e2e if r["batch"] == batch and (_format(r), r["backend"]) == (fmt, backend)),
                         key=lambda r: r["sparsity"])
            if not pts:
                continue
            shift = (i / max(1, len(series) - 1) - 0.5) * width if len(series) > 1 else 0.0
            x = [r["sparsity"] + shift for r in pts]
            y = [r["speedup"] for r in pts]
            lo_hi = [speedup_range(r) for r in pts]
            err = [[v - lo for v, (lo, _) in zip(y, lo_hi, strict=True)],
                   [hi - v for v, (_, hi) in zip(y, lo_hi, strict=True)]]
            ax.errorbar(x, y, yerr=err, fmt=markers[i % len(markers)], ls="none", capsize=3, ms=5,
                        color=f"C{i % 10}", label=f"{fmt} / {backend}")
        ax.axhline(1.0, ls="--", color="gray", lw=1)
        ax.set(xlabel="sparsity (fraction of weights pruned)", title=f"batch {batch}")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("speedup vs dense (x), median")
    if series:
        axes[0][-1].legend(fontsize=7, loc="best")
    reps = sorted({r.get("reps") for r in e2e if r.get("reps")})
    fig.suptitle(f"Speedup: {_setting(e2e)}" if e2e else "Speedup: no measured point", fontsize=10)
    fig.text(0.5, 0.005, f"points: median of {'/'.join(map(str, reps)) or '?'} timed rounds; bars: quartile range "
             "(dense q1 / sparse q3 to dense q3 / sparse q1); dashed: dense", ha="center", fontsize=7)
    fig.tight_layout(rect=(0, 0.03, 1, 0.97))
    paths.append(out / "speedup.png")
    atomic.save_figure(fig, paths[-1], dpi=110)
    plt.close(fig)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    seen = {}
    for r in e2e:
        seen.setdefault(f"{_format(r)} {r['sparsity']:.2f}", r["bytes"] / 1e6)
    if e2e:
        ax.bar(["dense", *seen], [e2e[0]["dense_bytes"] / 1e6, *seen.values()])
    models = " / ".join(dict.fromkeys(f"{r['model']}, {r['dtype']}" for r in e2e))
    ax.set(ylabel="weight MB (indices and metadata included)", title=f"Weight memory per format: {models}")
    ax.title.set_fontsize(9)
    ax.tick_params(axis="x", rotation=45, labelsize=7)
    fig.tight_layout()
    paths.append(out / "memory.png")
    atomic.save_figure(fig, paths[-1], dpi=110)
    plt.close(fig)
    return paths


def write_latency(rows: Sequence[dict[str, Any]], out: str | Path) -> list[Path]:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    atomic.write_text(out / "latency.json", json.dumps(list(rows), indent=1))  # crash-safe, as every output
    atomic.write_text(out / "latency.md", markdown(rows))
    return [out / "latency.json", out / "latency.md", *plot(rows, out)]


__all__ = ["ROW_KEYS", "STATUSES", "bad_rows", "bench_e2e", "bench_layers", "block_masks", "layer_counts",
           "linear_shapes", "markdown", "mask_kind", "natural_masks", "plot", "points", "resolve_backend",
           "speedup_range",
           "write_latency"]
