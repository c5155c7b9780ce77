"""ViT-B/16 end to end on the CPU: our sparse formats against DeepSparse and ONNX Runtime.

One process, one input, rotating rounds; every time is reported as a ratio against torch dense
eager (1.00x) measured in the same rounds: per round ``dense ms / variant ms``, then the median
and quartiles of those per-round ratios (the 2 shared cores drift; a ratio within one round
does not). Not part of ``make test``.

Variants, for each mask set (``l1_unstructured`` at every ``--sparsity`` on every encoder
Linear, the classifier left dense; ``--formats bsr`` adds block masks, ``2:4`` adds N:M masks):

- ``torch dense``: the unpruned model, eager (the baseline);
- ``sparse_prune <format>``: ``sp.convert(model, masks, format=F)`` through the public API only
  (whatever CPU kernel ``convert`` picks today or later; ``report()`` names it in the row);
- ``onnxruntime``: the masked model exported to ONNX, run dense by ONNX Runtime;
- ``deepsparse``: the same masked ONNX, where DeepSparse exploits the zeros; and once
  ``deepsparse (unpruned)`` on the unpruned ONNX, for DeepSparse's ratio over its own dense;
- with ``--compile``: ``torch.compile`` of the dense model and of every sparse_prune variant
  (compiled before timing; our ops stay custom ops, inductor fuses what lies between them).
- with ``--attention sparse_prune``: every sparse_prune variant runs our attention kernel
  (``sp.set_attention``; the ONNX files still come from the sdpa model), and ``torch dense +
  our attention`` shows what that kernel alone gives the dense model; the baseline stays torch
  dense with torch's SDPA, so the peers' ratios do not move.

Each variant's output is checked against the masked dense torch model first (max abs diff in
the row; ``wrong`` when it exceeds ``--tol`` x max|reference| and then not timed). A peer that
cannot be imported, exported to or compiled gives rows with status ``skipped: <reason>`` and
the rest still runs. Writes ``peers_b<batch>.json`` and ``.md`` to ``--out`` (default
``benchmarks/results/cpu-<cpu name>/``).

Usage::

    python benchmarks/cpu_peers.py                       # batch 1, 50/70/90%, csr, 5 rounds
    python benchmarks/cpu_peers.py --batch 8 --formats csr bsr 2:4 --block 4 1
    python benchmarks/cpu_peers.py --sparsity 0.9 --rounds 2 --out /tmp/peers-smoke   # smoke

Environment (DeepSparse 1.8 supports Python <= 3.11 and needs numpy < 2 and onnx < 1.15, which
pip's resolver picks by itself from ``deepsparse==1.8.0``; keep the peers out of the project's
own .venv). Commands that worked (x86-64, Linux)::

    python3.11 -m venv /work/venv-peers
    /work/venv-peers/bin/pip install torch==2.14.1
    /work/venv-peers/bin/pip install deepsparse==1.8.0 onnxruntime   # -> onnx 1.14.1, numpy 1.26.4
    /work/venv-peers/bin/pip install transformers safetensors "numpy<2"
    SPARSE_PRUNE_CUDA=0 /work/venv-peers/bin/pip install --no-build-isolation -e . "numpy<2"
    # or, from the project: pip install -e ".[peers]"  (pyproject's `peers` extra)
    /work/venv-peers/bin/python benchmarks/cpu_peers.py

The ONNX files come from torch's TorchScript exporter (``dynamo=False``) at opset 14 by
default: at opset 17 the exported ``LayerNormalization`` is not among DeepSparse 1.8's
supported ops (0.93 of the graph ran in its engine, 1.0 at opset 14).
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

os.environ.setdefault("NM_DISABLE_ANALYTICS", "1")  # DeepSparse/SparseZoo: no usage pings

import torch  # noqa: E402
from torch import nn  # noqa: E402
from tqdm.auto import tqdm  # noqa: E402

import sparse_prune as sp  # noqa: E402
from sparse_prune.timing import _cpu_name, cpu_slug  # noqa: E402

HEAD = r"(^|\.)(classifier|head|heads)(\.|$)"  # the classifier stays dense (transformers/timm/torchvision)
ROOT = Path(__file__).resolve().parent.parent


# ---------------------------------------------------------------------------- environment


def git_commit() -> str:
    def git(*args: str) -> str:
        out = subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=10)
        return out.stdout.strip()

    try:
        head = git("rev-parse", "--short", "HEAD") or "unknown"
        return head + ("+dirty" if git("status", "--porcelain", "--untracked-files=no") else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def version(module: str) -> str | None:
    try:
        from importlib.metadata import version as v

        return v(module)
    except Exception:  # noqa: BLE001 - absent or broken metadata: just say so
        return None


def first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"[:300]


# ---------------------------------------------------------------------------- variants


@dataclass
class Variant:
    name: str
    engine: str  # torch | sparse_prune | onnxruntime | deepsparse
    masks: str  # mask set label ("l1", "block 4x1", "2:4", "none")
    sparsity: float
    fn: Callable[[], Any] | None = None
    status: str = "ok"
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def key(self) -> str:
        """Unique among the variants: name, mask set and sparsity."""
        return self.name if self.masks == "none" else f"{self.name} | {self.masks} | {self.sparsity:.4f}"


def logits_of(out: Any) -> torch.Tensor:
    if isinstance(out, torch.Tensor):
        return out
    if hasattr(out, "logits"):
        return out.logits
    if isinstance(out, (tuple, list)):
        return out[0]
    raise TypeError(f"cannot find logits in {type(out).__name__}")


def agree(got: Any, want: torch.Tensor, tol: float) -> tuple[str, dict[str, Any]]:
    got = torch.as_tensor(got).float().reshape(want.shape)
    diff = (got - want).abs().max().item()
    scale = want.abs().max().item()
    info = {"max_abs_diff": diff, "ref_max_abs": scale}
    if not (diff == diff) or diff > tol * max(scale, 1e-6):  # NaN or far off
        return f"wrong: max abs diff {diff:.3g} > {tol:g} x max|ref| ({scale:.3g})", info
    return "ok", info


def make_masks(model: nn.Module, kind: str, sparsity: float, block: tuple[int, int]) -> sp.MaskSet:
    if kind == "l1":
        return sp.prune(model, "l1_unstructured", amount=sparsity, exclude=(HEAD,))
    if kind == "2:4":
        return sp.prune(model, "nm", pattern="2:4", exclude=(HEAD,))
    if kind == "block":
        if "block" in sp.METHODS:  # the public block pruner (issue 22), once it lands
            return sp.prune(model, "block", amount=sparsity, block=block, exclude=(HEAD,))
        from sparse_prune.bench.latency import block_masks  # the bench's helper before that

        return block_masks(model, sparsity, block, exclude=(HEAD,))
    raise ValueError(kind)


def kernels_of(model: nn.Module) -> str:
    rows = sp.report(model)
    count = Counter(f"{r.get('format', '?')}/{r.get('kernel') or r.get('backend', '?')}" for r in rows)
    return ", ".join(f"{k} x{n}" for k, n in count.most_common())


def export_onnx(model: nn.Module, x: torch.Tensor, path: Path, opset: int) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (x,), str(path), dynamo=False, opset_version=opset,
                          input_names=["pixel_values"], output_names=["logits"], do_constant_folding=True)


class Peers:
    """Lazy ONNX Runtime and DeepSparse: each says once why it cannot run, the rest goes on."""

    def __init__(self, threads: int, opset: int, workdir: Path, want: set[str]):
        self.threads, self.opset, self.workdir = threads, opset, workdir
        self.why: dict[str, str | None] = {}
        self.ort = self.ds = None
        if "onnxruntime" in want:
            try:
                import onnxruntime as ort

                self.ort, self.why["onnxruntime"] = ort, None
            except Exception as exc:  # noqa: BLE001 - any import failure is a reason to skip
                self.why["onnxruntime"] = f"skipped: onnxruntime not importable ({first_line(exc)})"
        else:
            self.why["onnxruntime"] = "skipped: --no-ort"
        if "deepsparse" in want:
            try:
                import deepsparse

                self.ds, self.why["deepsparse"] = deepsparse, None
            except Exception as exc:  # noqa: BLE001
                self.why["deepsparse"] = f"skipped: deepsparse not importable ({first_line(exc)})"
        else:
            self.why["deepsparse"] = "skipped: --no-deepsparse"

    def export(self, model: nn.Module, x: torch.Tensor, tag: str) -> tuple[Path | None, str | None]:
        if self.ort is None and self.ds is None:
            return None, None
        path = self.workdir / f"{re.sub(r'[^A-Za-z0-9]+', '_', tag)}.onnx"
        try:
            export_onnx(model, x, path, self.opset)
        except Exception as exc:  # noqa: BLE001
            return None, f"skipped: ONNX export failed ({first_line(exc)})"
        return path, None

    def ort_fn(self, path: Path, x: torch.Tensor) -> tuple[Callable[[], Any], dict[str, Any]]:
        ort = self.ort
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = self.threads
        opts.inter_op_num_threads = 1
        opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        # no spinning after a run: its threads would steal the 2 cores from the next variant
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        name = sess.get_inputs()[0].name
        feed = {name: x.numpy()}
        return (lambda: sess.run(None, feed)[0]), {"providers": sess.get_providers()}

    def ds_fn(self, path: Path, x: torch.Tensor) -> tuple[Callable[[], Any], dict[str, Any]]:
        engine = self.ds.Engine(str(path), batch_size=x.shape[0], num_cores=self.threads)
        feed = [x.numpy()]
        info = {"fraction_of_supported_ops": getattr(engine, "fraction_of_supported_ops", None),
                "cpu_avx_type": getattr(engine, "cpu_avx_type", None)}
        return (lambda: engine.run(feed)[0]), info


# ---------------------------------------------------------------------------- timing


def time_rounds(variants: list[Variant], warmup: int, rounds: int, gap_s: float) -> dict[str, list[float]]:
    """Milliseconds per call, one call of each variant per round, the order rotating by one
    each round; ``gap_s`` of sleep between calls (outside the timed region) lets the previous
    engine's worker threads go idle before the next one starts."""
    live = [v for v in variants if v.status == "ok" and v.fn is not None]
    samples: dict[str, list[float]] = {v.key: [] for v in live}
    gc.collect()
    gc.disable()
    try:
        with torch.inference_mode():
            for _ in tqdm(range(warmup), desc="warm-up rounds", leave=False):
                for v in live:
                    v.fn()
                    time.sleep(gap_s)
            for r in tqdm(range(rounds), desc="timed rounds"):
                for i in range(len(live)):
                    v = live[(i + r) % len(live)]
                    t0 = time.perf_counter()
                    v.fn()
                    samples[v.key].append((time.perf_counter() - t0) * 1e3)
                    time.sleep(gap_s)
    finally:
        gc.enable()
    return samples


def quartiles(xs: list[float]) -> tuple[float, float, float]:
    s = sorted(xs)

    def q(p: float) -> float:
        pos = p * (len(s) - 1)
        lo = int(pos)
        hi = min(lo + 1, len(s) - 1)
        return s[lo] + (s[hi] - s[lo]) * (pos - lo)

    return q(0.25), statistics.median(s), q(0.75)


def ratio_stats(num: list[float], den: list[float]) -> dict[str, float]:
    """Per-round ``num / den`` (same round), median and quartiles."""
    q1, med, q3 = quartiles([a / b for a, b in zip(num, den, strict=True)])
    return {"median": med, "q1": q1, "q3": q3}


# ---------------------------------------------------------------------------- main


def compiled_variant(name: str, engine: str, label: str, sparsity: float, module: torch.nn.Module,
                     x: torch.Tensor, ref: torch.Tensor, tol: float) -> Variant:
    """``torch.compile(module)`` (inductor, default mode) as a variant: our ops stay opaque custom
    ops, inductor fuses what is between them (LayerNorm, residual adds, the attention's glue).
    Compiled and checked here, so the compile time is never timed."""
    v = Variant(name, engine, label, sparsity)
    try:
        compiled = torch.compile(module)
        with torch.inference_mode():
            v.status, info = agree(logits_of(compiled(x)), ref, tol)
        v.info.update(info)
        v.fn = lambda m=compiled: m(x)
    except Exception as exc:  # noqa: BLE001
        v.status = f"failed: {first_line(exc)}"
        traceback.print_exc()
    return v


def build(args: argparse.Namespace, workdir: Path) -> tuple[list[Variant], Peers]:
    torch.manual_seed(args.seed)
    dense = sp.models.vit(args.model, source=args.source, weights=None)
    x = torch.randn(args.batch, 3, 224, 224, generator=torch.Generator().manual_seed(args.seed + 1))
    want_peers = {name for name, off in (("onnxruntime", args.no_ort), ("deepsparse", args.no_deepsparse))
                  if not off}
    peers = Peers(args.threads, args.opset, workdir, want_peers)

    variants = [Variant("torch dense", "torch", "none", 0.0, fn=lambda: dense(x))]
    with torch.inference_mode():
        variants[0].info["max_abs_diff"] = 0.0
        dense_out = logits_of(dense(x)).float()
    ours = dense  # what our variants are converted from: the dense model with --attention
    if args.attention != "sdpa":
        ours = sp.set_attention(copy.deepcopy(dense), args.attention)
        v = Variant(f"torch dense + {args.attention} attention", "torch", "none", 0.0)
        with torch.inference_mode():
            v.status, info = agree(logits_of(ours(x)), dense_out, args.tol)
        v.info.update(info)
        v.fn = lambda: ours(x)
        variants.append(v)
    if args.compile:
        variants.append(compiled_variant("torch dense + torch.compile", "torch", "none", 0.0, dense, x, dense_out,
                                         args.tol))

    plan: list[tuple[str, float, list[str]]] = []  # (mask kind, sparsity, torch formats on it)
    l1_formats = [f for f in args.formats if f in ("csr", "auto", "dense")]
    for s in args.sparsity:
        if l1_formats:
            plan.append(("l1", s, l1_formats))
        if "bsr" in args.formats:
            plan.append(("block", s, ["bsr"]))
    if "2:4" in args.formats:
        plan.append(("2:4", 0.5, ["2:4"]))

    if peers.ds is not None and not args.no_peer_dense:  # DeepSparse over its own dense
        path, why = peers.export(dense, x, "unpruned")
        v = Variant("deepsparse (unpruned)", "deepsparse", "none", 0.0)
        if why:
            v.status = why
        else:
            _peer(v, peers.ds_fn, path, x, dense_out, args.tol)
        variants.append(v)

    for kind, s, formats in tqdm(plan, desc="build variants"):
        label = f"block {args.block[0]}x{args.block[1]}" if kind == "block" else kind
        try:
            masks = make_masks(dense, kind, s, tuple(args.block))
        except Exception as exc:  # noqa: BLE001
            for f in formats:
                variants.append(Variant(f"sparse_prune {f}", "sparse_prune", label, s,
                                        status=f"skipped: masks failed ({first_line(exc)})"))
            continue
        real = masks.sparsity()
        masked = masks.apply(copy.deepcopy(dense))
        with torch.inference_mode():
            ref = logits_of(masked(x)).float()
        for f in formats:
            v = Variant(f"sparse_prune {f}", "sparse_prune", label, real)
            kw: dict[str, Any] = {}
            if f == "bsr":
                kw["block"] = tuple(args.block)
            if f == "auto":
                kw["example_inputs"] = x
            try:
                with warnings.catch_warnings(record=True) as caught:
                    warnings.simplefilter("always")
                    fast = sp.convert(ours, masks, format=f, **kw)
                if caught:
                    v.info["warnings"] = "; ".join(str(w.message) for w in caught)[:500]
                with torch.inference_mode():
                    v.status, info = agree(logits_of(fast(x)), ref, args.tol)
                v.info.update(info, kernels=kernels_of(fast))
                v.fn = lambda m=fast: m(x)
            except ValueError as exc:  # convert refused (documented): say why, go on
                v.status = f"skipped: {first_line(exc)}"
            except Exception as exc:  # noqa: BLE001
                v.status = f"failed: {first_line(exc)}"
                traceback.print_exc()
            variants.append(v)
            if args.compile and v.fn is not None:
                variants.append(compiled_variant(f"sparse_prune {f} + torch.compile", "sparse_prune", label, real,
                                                 fast, x, ref, args.tol))
        path, why = peers.export(masked, x, f"{label}_{s}")
        del masked
        for engine, make in (("onnxruntime", peers.ort_fn), ("deepsparse", peers.ds_fn)):
            v = Variant(engine, engine, label, real)
            v.status = peers.why[engine] or why or "ok"
            if v.status == "ok":
                _peer(v, make, path, x, ref, args.tol)
            variants.append(v)
        gc.collect()
    variants[0].info["dense_out_max_abs"] = dense_out.abs().max().item()
    return variants, peers


def _peer(v: Variant, make: Callable, path: Path, x: torch.Tensor, ref: torch.Tensor, tol: float) -> None:
    try:
        fn, info = make(path, x)
        v.status, agreement = agree(fn(), ref, tol)
        v.info.update(info, **agreement)
        v.fn = fn
    except Exception as exc:  # noqa: BLE001 - a peer that cannot compile or run is skipped
        v.status = f"skipped: {v.engine} failed ({first_line(exc)})"
        traceback.print_exc()


def rows_of(variants: list[Variant], samples: dict[str, list[float]]) -> list[dict[str, Any]]:
    base = samples.get("torch dense")
    own = samples.get("deepsparse (unpruned)")
    rows = []
    for v in variants:
        row: dict[str, Any] = {"variant": v.name, "engine": v.engine, "masks": v.masks,
                               "sparsity": round(v.sparsity, 4), "status": v.status, **v.info}
        key = v.key
        if key in samples and base:
            ms = samples[key]
            row["ms_median"] = statistics.median(ms)  # for diagnosis only: compare ratios
            row["ratio"] = ratio_stats(base, ms)  # torch dense ms / this ms, per round
            if v.engine == "deepsparse" and own and key != "deepsparse (unpruned)":
                row["ratio_vs_own_dense"] = ratio_stats(own, ms)
        rows.append(row)
    return rows


def markdown(meta: dict[str, Any], rows: list[dict[str, Any]]) -> str:
    def r(x: dict[str, float] | None) -> str:
        return f"{x['median']:.2f}x ({x['q1']:.2f}-{x['q3']:.2f})" if x else ""

    smoke = " **Smoke run (fewer than 5 rounds): not a result.**" if meta["rounds"] < 5 else ""
    if meta["loadavg_start"][0] > 0.5 * (meta["cpu_count"] or 1):  # others were running
        smoke += (f" **The CPU was busy before this run (load {meta['loadavg_start'][0]:.1f} on "
                  f"{meta['cpu_count']} cores): OpenMP-threaded torch suffers more from contention than "
                  f"the peers' pools, so the ratios may be contention artefacts.**")
    lines = [f"# {meta['model']} end to end on the CPU: sparse_prune vs DeepSparse and ONNX Runtime "
             f"(batch {meta['batch']})",
             "",
             f"{meta['model']} ({meta['source']}, random weights), fp32, batch {meta['batch']}, "
             f"{meta['threads']} threads, {meta['device']}; torch {meta['versions']['torch']}, "
             f"onnxruntime {meta['versions']['onnxruntime']}, deepsparse {meta['versions']['deepsparse']}, "
             f"onnx {meta['versions']['onnx']}; commit {meta['commit']}; {meta['rounds']} timed rounds "
             f"(+{meta['warmup']} warm-up), order rotating, ONNX opset {meta['opset']}; load average "
             f"{meta['loadavg_start'][0]:.1f} at start, {meta['loadavg_end'][0]:.1f} at end.{smoke}",
             "",
             "Ratio = torch dense eager ms / variant ms in the same round: median (quartiles) over "
             "rounds; > 1 is faster than dense. Masks on every encoder Linear (classifier dense): "
             "l1 = `l1_unstructured`, block = whole blocks by magnitude, 2:4 = `nm`. Max abs diff: "
             "against the masked dense torch model's logits. Vs own dense: DeepSparse on the unpruned "
             "ONNX, same rounds.",
             "",
             "| variant | masks | sparsity | status | max abs diff | vs torch dense | vs own dense | kernels / notes |",
             "|---|---|---|---|---|---|---|---|"]
    def cell(text: Any) -> str:
        return str(text).replace("|", "\\|")

    for row in rows:
        note = row.get("kernels") or (f"supported ops {row['fraction_of_supported_ops']:.2f}"
                                      if row.get("fraction_of_supported_ops") is not None else "")
        diff = row.get("max_abs_diff")
        lines.append(f"| {row['variant']} | {row['masks']} | {row['sparsity']:.0%} | {cell(row['status'])} | "
                     f"{'' if diff is None else f'{diff:.2g}'} | {r(row.get('ratio'))} | "
                     f"{r(row.get('ratio_vs_own_dense'))} | {cell(note)} |")
    return "\n".join(lines) + "\n"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="vit_base_patch16_224")
    ap.add_argument("--source", default="transformers", choices=sp.models.SOURCES)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--sparsity", type=float, nargs="+", default=[0.5, 0.7, 0.9])
    ap.add_argument("--formats", nargs="+", default=["csr"], choices=["csr", "bsr", "2:4", "auto", "dense"],
                    help="our formats: csr/auto/dense on L1 masks, bsr on block masks (--block), 2:4 on N:M masks")
    ap.add_argument("--block", type=int, nargs=2, default=[4, 1], metavar=("BM", "BK"))
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--gap-ms", type=float, default=20.0, help="idle gap between timed calls")
    ap.add_argument("--tol", type=float, default=1e-2, help="'wrong' above tol x max|reference logits|")
    ap.add_argument("--opset", type=int, default=14)
    ap.add_argument("--no-ort", action="store_true")
    ap.add_argument("--no-deepsparse", action="store_true")
    ap.add_argument("--no-peer-dense", action="store_true", help="skip DeepSparse on the unpruned ONNX")
    ap.add_argument("--compile", action="store_true",
                    help="also time torch.compile of the dense model and of every sparse_prune variant")
    ap.add_argument("--attention", default="sdpa", choices=["sdpa", "sparse_prune"],
                    help="attention of our variants (sp.set_attention); the baseline keeps torch's sdpa")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None, help="default benchmarks/results/cpu-<cpu name>/")
    args = ap.parse_args(argv)
    if args.rounds < 1 or args.warmup < 0 or args.batch < 1 or args.threads < 1:
        ap.error("--rounds, --batch and --threads must be >= 1, --warmup >= 0")
    if any(not 0.0 <= s < 1.0 for s in args.sparsity):
        ap.error("--sparsity values must be in [0, 1)")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    out = Path(args.out) if args.out else ROOT / "benchmarks" / "results" / f"cpu-{cpu_slug()}"
    started, load_start = time.time(), os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="cpu_peers_") as tmp:
        variants, peers = build(args, Path(tmp))
        for v in variants:
            if v.status != "ok":
                print(f"{v.name} [{v.masks} {v.sparsity:.0%}]: {v.status}", file=sys.stderr)
        samples = time_rounds(variants, args.warmup, args.rounds, args.gap_ms / 1e3)
    rows = rows_of(variants, samples)
    meta = {"kind": "e2e-peers", "model": args.model, "source": args.source, "dtype": "float32",
            "batch": args.batch, "threads": args.threads, "torch_threads": torch.get_num_threads(),
            "rounds": args.rounds, "warmup": args.warmup, "gap_ms": args.gap_ms, "opset": args.opset,
            "tol": args.tol, "attention": args.attention, "formats": args.formats, "block": args.block, "sparsity": args.sparsity,
            "device": _cpu_name(), "cpu_count": os.cpu_count(), "commit": git_commit(),
            "python": platform.python_version(), "wall_s": round(time.time() - started, 1),
            "smoke": args.rounds < 5, "loadavg_start": load_start, "loadavg_end": os.getloadavg(), "command": " ".join(sys.argv),
            "versions": {m: version(m) for m in ("torch", "onnxruntime", "deepsparse", "onnx", "numpy",
                                                   "transformers", "sparse_prune")},
            "peer_status": {k: w or "ok" for k, w in peers.why.items()}}
    out.mkdir(parents=True, exist_ok=True)
    stem = out / f"peers_b{args.batch}"
    stem.with_suffix(".json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")
    md = markdown(meta, rows)
    stem.with_suffix(".md").write_text(md)
    print(md)
    print(f"wrote {stem}.json and {stem}.md", file=sys.stderr)
    return 1 if any(r["status"].startswith(("wrong", "failed")) for r in rows) else 0


if __name__ == "__main__":
    raise SystemExit(main())
