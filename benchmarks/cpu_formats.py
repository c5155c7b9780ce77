"""ViT-B/16 on this CPU: dense vs coupled ``shrink`` (50%) vs ``csr`` (90%), torch backend.

Usage: ``python benchmarks/cpu_formats.py [--batch 8] [--reps 5] [--out benchmarks/results/cpu]``.
Every variant is checked against its masked dense model before timing; all are timed
interleaved in one process (median of ``--reps`` after warm-up). Writes ``formats_b{batch}.json``
(rows as in ``sparse-prune bench``) and ``formats_b{batch}.md``.
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
from pathlib import Path

import torch
import triton
from torch import nn

import sparse_prune as sp
from sparse_prune.bench import describe_device, time_interleaved
from sparse_prune.timing import git_commit

VARIANTS = {  # label -> (method, prune kwargs, format, sparsity)
    "shrink": ("ln_structured", {"amount": 0.5, "coupled": True, "exclude": [r"classifier"]}, "shrink", 0.5),
    "csr": ("l1_unstructured", {"amount": 0.9}, "csr", 0.9),
}


def _bytes(model: nn.Module) -> int:
    return sum(r["bytes"] for r in sp.report(model))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--out", default="benchmarks/results/cpu")
    args = ap.parse_args()
    torch.manual_seed(0)
    dense = sp.models.vit("vit_base_patch16_224", source="transformers")
    images = torch.randn(args.batch, 3, 224, 224)
    fns = {"dense": lambda: dense(images)}
    models = {}
    for label, (method, kw, fmt, _) in VARIANTS.items():
        masks = sp.prune(dense, method, **kw)
        models[label] = sp.convert(dense, masks, format=fmt)
        with torch.inference_mode():
            want = masks.apply(copy.deepcopy(dense))(images).logits
            got = models[label](images).logits
        err = (got - want).abs().max().item()
        if err > 1e-3 * want.abs().max().item():
            raise SystemExit(f"{label}: converted model differs from masked dense by {err}")
        fns[label] = lambda m=models[label]: m(images)
    ms = time_interleaved(fns, "cpu", warmup=1, reps=args.reps)
    common = {"kind": "e2e", "model": "vit_base_patch16_224 (transformers)", "device": describe_device("cpu"),
              "dtype": "float32", "batch": args.batch, "backend": "torch", "torch": torch.__version__,
              "triton": triton.__version__, "commit": git_commit(), "python": platform.python_version()}
    rows = [{**common, "format": label, "sparsity": VARIANTS[label][3], "dense_ms": ms["dense"],
             "sparse_ms": ms[label], "speedup": ms["dense"] / ms[label], "bytes": _bytes(models[label]),
             "dense_bytes": _bytes(dense)} for label in VARIANTS]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"formats_b{args.batch}.json").write_text(json.dumps(rows, indent=1))
    lines = [f"ViT-B/16 fp32, batch {args.batch}, {common['device']}, torch {torch.__version__}, "
             f"commit {common['commit']}; median of {args.reps} interleaved runs.", "",
             "| format | sparsity | dense ms | sparse ms | speedup | weight MB (sparse / dense) |",
             "|---|---|---|---|---|---|"]
    lines += [f"| {r['format']} | {r['sparsity']:.0%} | {r['dense_ms']:.0f} | {r['sparse_ms']:.0f} | "
              f"{r['speedup']:.2f}x | {r['bytes'] / 1e6:.0f} / {r['dense_bytes'] / 1e6:.0f} |" for r in rows]
    (out / f"formats_b{args.batch}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
