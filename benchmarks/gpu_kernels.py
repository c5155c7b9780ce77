"""Per-kernel GPU timings (issue 4): our Triton and CUDA kernels against cuBLAS and torch's sparse paths.

ViT-B/16 shapes M = batch·197, (K, N) ∈ {(768, 2304), (768, 768), (768, 3072), (3072, 768)},
batch ∈ {1, 8, 64, 256}, bf16 by default. For each shape: dense ``F.linear`` (cuBLAS), our
Triton ``csr``/``bsr`` at 90% and ``2:4``, our CUDA ``csr`` and ``2:4`` (mma.sp), our Hopper
``2:4`` (``cutlass-sm90``: CUTLASS sm90a wgmma.sp, ``sparse_prune._C_sm90``, tile picked by M, and
each tile config forced as ``cutlass-sm90-<tile>``), our ``cusparselt-searched`` backend
(``torch._cslt_*``, algorithm searched once), and torch's peers, each row named by its own backend: ``torch.sparse`` (cuSPARSE CSR/BSR through
``torch.sparse.mm``), ``torch.sparse._triton_ops.bsr_dense_mm`` (torch's Triton BSR kernel),
``cusparselt`` and ``cutlass`` (``to_sparse_semi_structured``, the latter with
``SparseSemiStructuredTensor._FORCE_CUTLASS = True``).

Every variant's output (the very callable that is then timed) is checked first with
:func:`sparse_prune.agreement.check_matches`: reference = the masked dense product in float64,
baseline = the masked dense product in the bench dtype (cuBLAS). Each row has a ``status``:
``ok`` (timed: ``triton.testing.do_bench`` median and quartiles), ``wrong`` (error figures and
reason; never timed), ``failed`` (one of *our* kernels raised) or ``skipped`` (a peer this torch
cannot run for this shape, or our CUDA extension missing; ``reason``). The table lists wrong
and failed rows first. Exit status 1 when any of our kernels (triton, cuda) is wrong or failed;
a wrong peer is shown the same way but does not fail the run.

Usage (GPU only): ``python benchmarks/gpu_kernels.py [--dtype bfloat16] [--out DIR]``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

import sparse_prune as sp
from sparse_prune import formats as fm
from sparse_prune.agreement import Mismatch, allowed_error, check_matches, relative_error
from sparse_prune.bench.latency import block_masks
from sparse_prune.timing import describe_device, git_commit

SHAPES = [(768, 2304), (768, 768), (768, 3072), (3072, 768)]  # (K, N)
BATCHES = [1, 8, 64, 256]
TOKENS = 197
OURS = ("triton", "cuda", "cusparselt-searched", "cutlass-sm90",
        *(f"cutlass-sm90-{tile}" for tile in ("128x128x128", "128x64x128")))
STATUS_ORDER = {"wrong": 0, "failed": 1, "ok": 2, "skipped": 3}


class Unavailable(RuntimeError):
    """The kernel does not exist here (e.g. no CUDA extension): a skip, ours or not."""


class Variant:
    """One kernel on one weight: ``fn`` computes ``x @ wref.T``; ``reason`` is set (and ``fn``
    is ``None``) when it cannot be prepared here; ``unavailable`` when it does not exist here."""

    def __init__(self, fmt: str, backend: str, wref: torch.Tensor, sparsity: float,
                 prepare: Callable[[], tuple[Callable[[], torch.Tensor], int | None]]):
        self.format, self.backend, self.wref, self.sparsity = fmt, backend, wref, sparsity
        self.fn: Callable[[], torch.Tensor] | None = None
        self.nbytes: int | None = None
        self.reason: str | None = None
        self.unavailable = False
        try:
            self.fn, self.nbytes = prepare()
        except Unavailable as exc:
            self.reason, self.unavailable = str(exc), True
        except Exception as exc:  # noqa: BLE001 - recorded in the row (skipped peer / failed kernel)
            self.reason = f"cannot prepare: {type(exc).__name__}: {str(exc)[:200]}"

    @property
    def ours(self) -> bool:
        return self.backend in OURS


@contextlib.contextmanager
def _force_cutlass(on: bool):
    from torch.sparse import SparseSemiStructuredTensor

    before = SparseSemiStructuredTensor._FORCE_CUTLASS
    SparseSemiStructuredTensor._FORCE_CUTLASS = on
    try:
        yield
    finally:
        SparseSemiStructuredTensor._FORCE_CUTLASS = before


def _semi_structured(w24: torch.Tensor, x: torch.Tensor, cutlass: bool):
    from torch.sparse import to_sparse_semi_structured

    with _force_cutlass(cutlass):
        t24 = to_sparse_semi_structured(w24)
    kind = type(t24).__name__.lower()
    want = "cutlass" if cutlass else "cusparselt"
    if want not in kind:  # torch fell back to the other library: not the peer this row names
        raise RuntimeError(f"to_sparse_semi_structured gave {type(t24).__name__}, not {want}")
    return (lambda: F.linear(x, t24)), None


def _bsr_dense_mm(wblk: torch.Tensor, x: torch.Tensor):
    from torch.sparse._triton_ops import bsr_dense_mm

    if bsr_dense_mm is None:
        raise Unavailable("torch.sparse._triton_ops.bsr_dense_mm is None here (torch found no Triton)")
    t_bsr = wblk.to_sparse_bsr((32, 32))
    xt = x.t().contiguous()  # [K, M]: its product is [N, M]
    bsr_dense_mm(t_bsr, xt)  # raises here (e.g. M % 16 != 0) rather than inside the timing
    return (lambda: bsr_dense_mm(t_bsr, xt).t()), None


def variants(w: torch.Tensor, x: torch.Tensor) -> list[Variant]:
    """Every kernel, ours and torch's, on ``w`` pruned the way each format wants."""
    import sparse_prune.kernels.triton_ops  # noqa: F401

    ops = torch.ops.sparse_prune
    n, k = w.shape
    holder = torch.nn.Sequential(torch.nn.Linear(k, n, bias=False).to(w))
    holder[0].weight.data.copy_(w)
    m90 = sp.prune(holder, "l1_unstructured", amount=0.9)["0.weight"]
    m24 = sp.prune(holder, "nm")["0.weight"]
    mblk = block_masks(holder, 0.9, (32, 32))["0.weight"]
    w90, w24, wblk = w * m90, w * m24, w * mblk
    csr = fm.CSR.from_dense(w, m90)
    order = csr.row_order()
    bsr = fm.BSR.from_dense(w, mblk, block=(32, 32))
    s24 = fm.SemiStructured.from_dense(w, m24)

    def cuda(fn, nbytes):
        def prepare():
            if not sp.has_cuda_extension():
                raise Unavailable(f"no CUDA extension: {sp.extension_error()}")
            return fn, nbytes
        return prepare

    out = [
        Variant("csr", "triton", w90, 0.9, lambda: (
            lambda: ops.csr_linear_triton(x, csr.values, csr.crow_indices, csr.col_indices, n, None, order), csr.nbytes)),
        Variant("bsr", "triton", wblk, 0.9, lambda: (
            lambda: ops.bsr_linear_triton(x, bsr.values, bsr.crow_indices, bsr.col_indices, n, None), bsr.nbytes)),
        Variant("2:4", "triton", w24, 0.5, lambda: (lambda: ops.semi24_linear_triton(x, s24.values, s24.meta, None),
                                                    s24.nbytes)),
        Variant("csr", "cuda", w90, 0.9, cuda(
            lambda: ops.csr_linear(x, csr.values, csr.crow_indices, csr.col_indices, n, None, order), csr.nbytes)),
        Variant("2:4", "cuda", w24, 0.5, cuda(lambda: ops.semi24_linear(x, s24.values, s24.meta, None),
                                              s24.nbytes)),
        Variant("2:4", "cusparselt-searched", w24, 0.5, lambda: _our_cusparselt(s24, x)),
        Variant("2:4", "cutlass-sm90", w24, 0.5, lambda: _sm90(s24, x, -1)),
    ]
    from sparse_prune.kernels import sm90

    out += [Variant("2:4", f"cutlass-sm90-{shape}", w24, 0.5, lambda t=tile: _sm90(s24, x, t))
            for tile, (shape, _cluster) in sm90.TILE_CONFIGS.items()]

    def torch_csr():
        t_csr = w90.to_sparse_csr()
        return (lambda: torch.sparse.mm(t_csr, x.t()).t()), None

    def torch_bsr():
        t_bsr = wblk.to_sparse_bsr((32, 32))
        return (lambda: torch.sparse.mm(t_bsr, x.t()).t()), None

    out += [Variant("csr", "torch.sparse", w90, 0.9, torch_csr),
            Variant("bsr", "torch.sparse", wblk, 0.9, torch_bsr),
            Variant("bsr", "torch.sparse._triton_ops.bsr_dense_mm", wblk, 0.9, lambda: _bsr_dense_mm(wblk, x)),
            Variant("2:4", "cusparselt", w24, 0.5, lambda: _semi_structured(w24, x, cutlass=False)),
            Variant("2:4", "cutlass", w24, 0.5, lambda: _semi_structured(w24, x, cutlass=True))]
    return out


def _sm90(s24: fm.SemiStructured, x: torch.Tensor, tile: int):
    """Our CUTLASS sm90a kernel: values + E packed once; ``tile`` -1 picks by M."""
    from sparse_prune.kernels import sm90

    if not sm90.has_sm90_extension():
        raise Unavailable(f"sm90 extension not loaded: {sm90.sm90_extension_error()}")
    if not sm90.has_sm90_device():
        raise Unavailable(f"needs an sm_90 GPU, this is {torch.cuda.get_device_name()}")
    n, k = s24.shape
    a, e = sm90.pack(s24.values, s24.meta, k)
    op = torch.ops.sparse_prune.semi24_sm90_linear
    return (lambda: op(x, a, e, n, None, 0, tile)), a.nbytes + e.nbytes


def _our_cusparselt(s24: fm.SemiStructured, x: torch.Tensor):
    """backend='cusparselt': torch._cslt_compress once, the algorithm searched once at bind."""
    if not torch.backends.cusparselt.is_available():
        raise Unavailable(f"torch {torch.__version__} has no cuSPARSELt")
    layer = sp.SparseLinear(s24, None, backend="cusparselt")
    return (lambda: layer(x)), s24.nbytes + layer.cslt_packed.numel() * layer.cslt_packed.element_size()


def _quartiles(fn: Callable[[], Any]) -> tuple[float, float, float]:
    from triton.testing import do_bench

    q1, med, q3 = do_bench(fn, quantiles=[0.25, 0.5, 0.75])
    return q1, med, q3


def measure(v: Variant, x: torch.Tensor, dense: tuple[float, float, float],
            timer: Callable[[Callable[[], Any]], tuple[float, float, float]] = _quartiles) -> dict[str, Any]:
    """Check ``v``'s output against the masked dense product, then time the same callable:
    the row's status, reason, error figures and times (``dense`` = cuBLAS q1, median, q3)."""
    n, k = v.wref.shape
    row: dict[str, Any] = {"shape": [n, k], "rows": x.shape[0], "format": v.format, "backend": v.backend,
                           "ours": v.ours, "sparsity": v.sparsity, "status": None, "reason": None,
                           "dense_q1": dense[0], "dense_ms": dense[1], "dense_q3": dense[2], "sparse_q1": None,
                           "sparse_ms": None, "sparse_q3": None, "speedup": None, "error": None,
                           "baseline_error": None, "allowed": None, "bytes": v.nbytes,
                           "dense_bytes": n * k * v.wref.element_size()}
    unable = "failed" if v.ours else "skipped"  # a peer this torch cannot run is a recorded skip
    if v.fn is None:
        return {**row, "status": "skipped" if v.unavailable else unable, "reason": v.reason}
    try:
        got = v.fn()
    except Exception as exc:  # noqa: BLE001
        return {**row, "status": unable, "reason": f"{type(exc).__name__}: {str(exc)[:200]}"}
    reference = F.linear(x.double(), v.wref.double())
    baseline = F.linear(x, v.wref)
    try:
        row.update(check_matches(got, reference, baseline, f"{v.format}/{v.backend} {n}x{k} M={x.shape[0]}"))
    except Mismatch as exc:
        base = relative_error(baseline, reference)
        return {**row, "status": "wrong", "reason": str(exc), "error": relative_error(got, reference),
                "baseline_error": base, "allowed": allowed_error(got.dtype, base)}
    q1, med, q3 = timer(v.fn)
    return {**row, "status": "ok", "sparse_q1": q1, "sparse_ms": med, "sparse_q3": q3, "speedup": dense[1] / med}


def markdown(rows: list[dict[str, Any]], header: str) -> str:
    shown = sorted((r for r in rows if r["status"] != "skipped"), key=lambda r: STATUS_ORDER[r["status"]])
    lines = [header, "", "| N x K | batch | variant | status | dense ms (q1-q3) | sparse ms (q1-q3) | speedup |",
             "|---|---|---|---|---|---|---|"]
    for r in shown:
        sparse = "-" if r["sparse_ms"] is None else f"{r['sparse_ms']:.4f} ({r['sparse_q1']:.4f}-{r['sparse_q3']:.4f})"
        status = r["status"] if r["status"] == "ok" else f"**{r['status'].upper()}**"
        lines.append(f"| {r['shape'][0]}x{r['shape'][1]} | {r['batch']} | {r['format']}/{r['backend']} | {status} | "
                     f"{r['dense_ms']:.4f} ({r['dense_q1']:.4f}-{r['dense_q3']:.4f}) | {sparse} | "
                     f"{'-' if r['speedup'] is None else format(r['speedup'], '.2f') + 'x'} |")
    lines.append("")
    lines += [f"{r['status'].upper()}: {r['format']}/{r['backend']} {r['shape'][0]}x{r['shape'][1]} "
              f"b{r['batch']}: {r['reason']}" for r in shown if r["status"] in ("wrong", "failed")]
    skipped = dict.fromkeys(f"{r['format']}/{r['backend']}: {r['reason']}" for r in rows if r["status"] == "skipped")
    lines += [f"skipped: {s}" for s in skipped]
    return "\n".join(lines) + "\n"


def main() -> int:
    import triton

    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16"))
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("gpu_kernels.py needs a CUDA device")
    warnings.filterwarnings("ignore", message=r"Sparse \w+ tensor support is in beta")  # torch's notice only
    dtype = getattr(torch, args.dtype)
    device = describe_device("cuda")
    common = {"kind": "layer", "model": "vit_base_patch16_224 shapes", "device": device, "dtype": args.dtype,
              "torch": torch.__version__, "triton": triton.__version__, "commit": git_commit()}
    rows = []
    try:  # `timeout -s INT` keeps the rows measured so far
        for k, n in SHAPES:
            torch.manual_seed(k * 31 + n)
            w = torch.randn(n, k, device="cuda", dtype=dtype) * 0.02
            for batch in BATCHES:
                x = torch.randn(batch * TOKENS, k, device="cuda", dtype=dtype)
                dense = _quartiles(lambda x=x, w=w: F.linear(x, w))
                flops = 2 * batch * TOKENS * n * k
                for v in variants(w, x):
                    rows.append({**common, "batch": batch, **measure(v, x, dense),
                                 "dense_tflops": flops / dense[1] / 1e9})
                print(f"done {n}x{k} batch {batch}", flush=True)
    except KeyboardInterrupt:
        print("interrupted: the rows are partial", file=sys.stderr)
    text = markdown(rows, f"{device}, {args.dtype}, torch {torch.__version__}, triton {triton.__version__}, "
                          f"commit {common['commit']}; do_bench median (q1-q3); dense = cuBLAS on the unpruned weight.")
    print(text)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "kernels.json").write_text(json.dumps({"rows": rows}, indent=1))
        (out / "kernels.md").write_text(text)
    bad = [r for r in rows if r["ours"] and r["status"] in ("wrong", "failed")]
    if bad:
        print(f"gpu_kernels.py: {len(bad)} of our kernel rows WRONG or FAILED", file=sys.stderr)
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(main())
