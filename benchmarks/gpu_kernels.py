"""Per-kernel GPU timings (issue 4): our Triton kernels against cuBLAS and torch's sparse paths.

ViT-B/16 shapes M = batch·197, (K, N) ∈ {(768, 2304), (768, 768), (768, 3072), (3072, 768)},
batch ∈ {1, 8, 64, 256}, bf16 by default. For each shape: dense ``F.linear`` (cuBLAS), our
Triton ``csr``/``bsr`` at 90% and ``2:4``, our CUDA ``csr`` and ``2:4`` (mma.sp), our Hopper
``2:4`` (CUTLASS sm90a wgmma.sp, ``sparse_prune._C_sm90``: tile picked by M, and each tile config
forced), and torch's peers (CSR and BSR ``torch.sparse.mm``, ``to_sparse_semi_structured``,
cuSPARSELt through ``torch._cslt_compress``/``torch._cslt_sparse_mm`` with the algorithm
searched once outside the timed region) where this torch runs them. Every variant is checked
against the masked dense product first; medians from ``triton.testing.do_bench``. What cannot
run here is listed with its reason.

Usage (GPU only): ``python benchmarks/gpu_kernels.py [--dtype bfloat16] [--out DIR]``.
"""

from __future__ import annotations

import argparse
import json
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
import triton
from triton.testing import do_bench

import sparse_prune as sp
from sparse_prune import formats as fm
from sparse_prune.bench.latency import block_masks
from sparse_prune.bench.timing import describe_device, git_commit

SHAPES = [(768, 2304), (768, 768), (768, 3072), (3072, 768)]  # (K, N)
BATCHES = [1, 8, 64, 256]
TOKENS = 197
SKIPPED: dict[str, str] = {}  # variant -> why it did not run on this machine


def _sm90_variants(out, x, s24, w24, k):
    """Our CUTLASS sm90a kernel: packed once (values + E), auto tile and each tile forced."""
    from sparse_prune.kernels import sm90

    if not sm90.has_sm90_extension():
        SKIPPED["2:4/cutlass-sm90"] = f"extension not loaded: {sm90.sm90_extension_error()}"
        return
    if not sm90.has_sm90_device():
        SKIPPED["2:4/cutlass-sm90"] = f"needs an sm_90 GPU, this is {torch.cuda.get_device_name()}"
        return
    if k % sm90.K_MULTIPLE:
        SKIPPED["2:4/cutlass-sm90"] = f"K % {sm90.K_MULTIPLE} != 0"
        return
    a, e = sm90.pack(s24.values, s24.meta, k)
    n, nbytes = w24.shape[0], a.nbytes + e.nbytes
    op = torch.ops.sparse_prune.semi24_sm90_linear
    out["2:4/cutlass-sm90"] = (lambda: op(x, a, e, n, None, 0, -1), w24, nbytes)
    for tile, (shape, _cluster) in sm90.TILE_CONFIGS.items():
        out[f"2:4/cutlass-sm90-{shape}"] = (lambda t=tile: op(x, a, e, n, None, 0, t), w24, nbytes)


def _cusparselt_variant(out, x, w24):
    """cuSPARSELt through torch's private ops; algorithm searched once, outside timing."""
    if not (hasattr(torch, "_cslt_compress") and hasattr(torch, "_cslt_sparse_mm")):
        SKIPPED["2:4/cusparselt"] = f"torch {torch.__version__} has no torch._cslt_* ops"
        return
    if not torch.backends.cusparselt.is_available():
        SKIPPED["2:4/cusparselt"] = "torch.backends.cusparselt.is_available() is False"
        return
    try:
        packed = torch._cslt_compress(w24)
        xt = x.t()  # W · Xᵀ = Yᵀ: the sparse operand is the weight, as in our kernels
        alg = None
        if hasattr(torch, "_cslt_sparse_mm_search"):
            alg = torch._cslt_sparse_mm_search(packed, xt)
            alg = alg[0] if isinstance(alg, (tuple, list)) else alg
        if alg is not None:
            torch._cslt_sparse_mm(packed, xt, alg_id=int(alg))
            out["2:4/cusparselt"] = (lambda: torch._cslt_sparse_mm(packed, xt, alg_id=int(alg)).t(), w24,
                                     packed.nbytes)
        else:
            out["2:4/cusparselt"] = (lambda: torch._cslt_sparse_mm(packed, xt).t(), w24, packed.nbytes)
    except (RuntimeError, TypeError, ValueError) as exc:
        SKIPPED["2:4/cusparselt"] = f"{type(exc).__name__}: {str(exc)[:160]}"


def _variants(w: torch.Tensor, x: torch.Tensor):
    """name -> (callable, reference output, format bytes); each prepared once per shape."""
    import sparse_prune.kernels.triton_ops  # noqa: F401

    ops = torch.ops.sparse_prune
    n, k = w.shape
    out = {}
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
    out["csr90/triton"] = (lambda: ops.csr_linear_triton(x, csr.values, csr.crow_indices, csr.col_indices, order, n, None),
                           w90, csr.nbytes)
    out["bsr90/triton"] = (lambda: ops.bsr_linear_triton(x, bsr.values, bsr.crow_indices, bsr.col_indices, n, None),
                           wblk, bsr.nbytes)
    out["2:4/triton"] = (lambda: ops.semi24_linear_triton(x, s24.values, s24.meta, None), w24, s24.nbytes)
    if sp.has_cuda_extension():
        out["csr90/cuda"] = (lambda: ops.csr_linear_cuda(x, csr.values, csr.crow_indices, csr.col_indices, order, n, None),
                             w90, csr.nbytes)
        if k % 16 == 0:
            out["2:4/cuda"] = (lambda: ops.semi24_linear_cuda(x, s24.values, s24.meta, None), w24, s24.nbytes)
    _sm90_variants(out, x, s24, w24, k)
    _cusparselt_variant(out, x, w24)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            t_csr = w90.to_sparse_csr()
            out["csr90/torch.sparse"] = (lambda: torch.sparse.mm(t_csr, x.t()).t(), w90, None)
        except RuntimeError:
            pass
        try:
            t_bsr = wblk.to_sparse_bsr((32, 32))
            out["bsr90/torch.sparse"] = (lambda: torch.sparse.mm(t_bsr, x.t()).t(), wblk, None)
        except RuntimeError:
            pass
        try:
            from torch.sparse import to_sparse_semi_structured

            t24 = to_sparse_semi_structured(w24)
            out["2:4/torch semi-structured"] = (lambda: F.linear(x, t24), w24, None)
        except (RuntimeError, ValueError, ImportError):
            pass
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16"))
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("gpu_kernels.py needs a CUDA device")
    dtype = getattr(torch, args.dtype)
    device = describe_device("cuda")
    common = {"kind": "layer", "model": "vit_base_patch16_224 shapes", "device": device, "dtype": args.dtype,
              "torch": torch.__version__, "triton": triton.__version__, "commit": git_commit()}
    rows, failures = [], []
    for k, n in SHAPES:
        torch.manual_seed(k * 31 + n)
        w = torch.randn(n, k, device="cuda", dtype=dtype) * 0.02
        for batch in BATCHES:
            x = torch.randn(batch * TOKENS, k, device="cuda", dtype=dtype)
            dense_ms = do_bench(lambda x=x, w=w: F.linear(x, w), return_mode="median")
            for name, (fn, wref, nbytes) in _variants(w, x).items():
                try:
                    got = fn().float()
                    want = F.linear(x.float(), wref.float())
                    err = (got - want).abs().max().item() / max(1.0, want.abs().max().item())
                    if err > 5e-2:
                        raise RuntimeError(f"wrong result (max rel err {err:.3g})")
                    ms = do_bench(fn, return_mode="median")
                except Exception as exc:  # noqa: BLE001 - a peer that cannot run is reported, not fatal
                    failures.append(f"{name} {n}x{k} b{batch}: {type(exc).__name__}: {str(exc)[:160]}")
                    continue
                flops = 2 * batch * TOKENS * n * k
                rows.append({**common, "shape": [n, k], "batch": batch, "format": name.split("/")[0],
                             "backend": name.split("/")[1], "sparsity": 0.5 if name.startswith("2:4") else 0.9,
                             "dense_ms": dense_ms, "sparse_ms": ms, "speedup": dense_ms / ms,
                             "dense_tflops": flops / dense_ms / 1e9, "bytes": nbytes,
                             "dense_bytes": n * k * w.element_size()})
            print(f"done {n}x{k} batch {batch}", flush=True)
    lines = [f"{device}, {args.dtype}, torch {torch.__version__}, triton {triton.__version__}, "
             f"commit {common['commit']}; do_bench medians.", "",
             "| N x K | batch | variant | dense ms | sparse ms | speedup |", "|---|---|---|---|---|---|"]
    lines += [f"| {r['shape'][0]}x{r['shape'][1]} | {r['batch']} | {r['format']}/{r['backend']} | "
              f"{r['dense_ms']:.4f} | {r['sparse_ms']:.4f} | {r['speedup']:.2f}x |" for r in rows]
    lines += ["", *(f"failed: {f}" for f in failures)]
    lines += [f"skipped {name}: {why}" for name, why in sorted(SKIPPED.items())]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "kernels.json").write_text(json.dumps({"rows": rows, "failures": failures, "skipped": SKIPPED},
                                                     indent=1))
        (out / "kernels.md").write_text(text)


if __name__ == "__main__":
    main()
