"""How long ``sp.prune(model, "sparsegpt", ...)`` takes on ViT-B/16 here, and its peak memory.

Usage: ``python benchmarks/sparsegpt_time.py [--images 128] [--batch 8] [--configs 2:4 0.5]``.
Builds ViT-B/16 offline (transformers, random weights), calibrates on random 224×224 images,
and prints, per configuration, the seconds, the layers pruned, the sparsity and the process's
peak resident memory; first a dense forward of one batch, to show how busy the cores are.
"""

from __future__ import annotations

import argparse
import resource
import time

import torch

import sparse_prune as sp


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default="vit_base_patch16_224", choices=list(sp.models.ARCHS))
    parser.add_argument("--images", type=int, default=128)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--configs", nargs="+", default=["2:4", "0.5"], help='"N:M" patterns or fractions')
    args = parser.parse_args()
    torch.manual_seed(0)
    model = sp.models.vit(args.model, source="transformers")
    gen = torch.Generator().manual_seed(0)
    batches = [torch.randn(args.batch, 3, 224, 224, generator=gen) for _ in range(args.images // args.batch)]
    t0 = time.perf_counter()
    with torch.no_grad():
        model(batches[0])
    print(f"{args.model}, {torch.get_num_threads()} threads, {len(batches) * args.batch} images; "
          f"one dense forward of {args.batch} images: {time.perf_counter() - t0:.2f} s", flush=True)
    for config in args.configs:
        kw = {"pattern": config} if ":" in config else {"amount": float(config)}
        t0 = time.perf_counter()
        masks = sp.prune(model, "sparsegpt", calibration=batches, **kw)
        seconds = time.perf_counter() - t0
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
        print(f"sparsegpt {config}: {seconds:.1f} s, {len(masks)} layers, sparsity {masks.sparsity():.4f}, "
              f"peak RSS {peak:.2f} GiB", flush=True)


if __name__ == "__main__":
    main()
