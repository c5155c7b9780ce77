"""End-to-end ViT-B/16 on this CPU: every sparse format against the dense model, in one process.

Usage: ``python benchmarks/cpu_e2e.py [--batches 1 8] [--reps 7] [--threads 2]
[--blocks 4x1 8x1 ...] [--points csr auto ...] [--attention sdpa|sparse_prune] [--tag NAME] [--out benchmarks/results/cpu-<cpu>]``.

ViT-B/16 (transformers, random weights), fp32, eager. Points: ``csr`` at 50/70/90% (L1
unstructured on every encoder Linear), ``2:4`` (magnitude), ``bsr`` at 70/90% for each block
(whole blocks kept by L2 norm, ``sp.prune(..., "block")``), coupled ``shrink`` at 50%, and ``format="auto"`` on the L1 masks
(measured per layer on the batch timed). Each point's converted model is checked against its
masked dense model (fp64 reference) before it is timed against the masked dense model in
rotating rounds (:func:`sparse_prune.bench.latency.bench_e2e`). Writes ``e2e.json``, ``e2e.md``,
``e2e_speedup.png`` and ``e2e_memory.png``; exits 1 if any point is wrong or failed.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

import sparse_prune as sp
from sparse_prune.bench import latency
from sparse_prune.timing import cpu_slug

MODEL = "vit_base_patch16_224"
POINTS = ("csr", "2:4", "shrink", "auto", "bsr")


def _block(text: str) -> tuple[int, int]:
    bm, _, bk = text.partition("x")
    return int(bm), int(bk)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--blocks", nargs="+", default=["4x1", "8x1", "16x1", "1x4", "1x8", "4x4", "16x16", "32x32"])
    ap.add_argument("--skip-auto", action="store_true")
    ap.add_argument("--points", nargs="+", choices=POINTS, default=list(POINTS),
                    help="which points to run (default: all)")
    ap.add_argument("--attention", choices=["sdpa", "sparse_prune"], default="sdpa",
                    help="the attention of dense and sparse models alike (sp.set_attention; default: torch's sdpa)")
    ap.add_argument("--tag", default="", help="write e2e_<tag>.{json,md,...} instead of e2e.*")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = sp.set_attention(sp.models.vit(MODEL, source="transformers").eval(), args.attention)
    common = dict(model_name=f"{MODEL} (transformers)", image_size=224, backends=["torch"], batches=args.batches,
                  reps=args.reps, device="cpu", dtype=torch.float32)
    points = set(args.points) - ({"auto"} if args.skip_auto else set())
    rows = []
    for fmt in ("csr", "2:4"):
        if fmt in points:
            rows += latency.bench_e2e(model, formats=[fmt], sparsities=[0.5, 0.7, 0.9], **common)
    if "shrink" in points:
        rows += latency.bench_e2e(model, formats=["shrink"], sparsities=[0.5], **common)
    if "auto" in points:
        rows += latency.bench_e2e(model, formats=["auto"], sparsities=[0.5, 0.7, 0.9], **common)
    for text in args.blocks if "bsr" in points else []:
        rows += latency.bench_e2e(model, formats=["bsr"], sparsities=[0.7, 0.9], bsr_block=_block(text), **common)
    out = Path(args.out or f"benchmarks/results/cpu-{cpu_slug()}")
    out.mkdir(parents=True, exist_ok=True)
    stem = f"e2e_{args.tag}" if args.tag else "e2e"
    meta = {"threads": args.threads, "cpu_isa": sp.ops.cpu_isa(), "reps": args.reps, "points": sorted(points),
            "attention": args.attention}
    (out / f"{stem}.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    text = latency.markdown(rows)
    (out / f"{stem}.md").write_text(f"{args.threads} threads, CPU kernels: {meta['cpu_isa']}, {args.reps} rounds, "
                                    f"attention {args.attention} (dense and sparse).\n\n"
                                    + text)
    for path in latency.plot(rows, out):
        path.rename(out / f"{stem}_{path.name}")
    print(text)
    return 1 if latency.bad_rows(rows) else 0


if __name__ == "__main__":
    raise SystemExit(main())
