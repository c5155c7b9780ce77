"""ViT-B/16's MLP block (fc1 768→3072, exact GELU, fc2 3072→768) on the CPU: the fused
``SparseMLP`` against the same two sparse layers called one after the other, and dense.

Usage: ``python benchmarks/cpu_mlp.py [--m 197 1576] [--rounds 15] [--threads 2] [--out DIR]``.

For each token count M one interleaved set (rotating rounds, medians, quartiles) times the dense
timm ``Mlp`` (F.linear, GELU, F.linear) and, for every mask set (L1-unstructured 50/70/90% as
``csr``, magnitude ``2:4``, 4x1 blocks at 90% as ``bsr``), two conversions of it through the
public API: ``fused`` (``sp.convert``'s default: a ``SparseMLP``, one ``sparse_mlp`` op whose
fc1 writes fc2's input panels) and ``two ops`` (``fuse_activations=False`` then ``fuse_gelu``:
the same kernels and the GELU still in fc1's epilogue, but the hidden [M, 3072] transposed out
of fc1 and packed back into fc2). Every output is checked against the masked dense MLP first.
Writes ``mlp.json``, ``mlp.md`` and ``mlp.png``.
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
from pathlib import Path

import torch
from timm.layers import Mlp

import sparse_prune as sp
from sparse_prune import agreement
from sparse_prune.bench.latency import block_masks
from sparse_prune.convert import fuse_gelu
from sparse_prune.timing import _cpu_name, cpu_slug, git_commit, spread, time_samples


def mask_sets(mlp: torch.nn.Module) -> dict[str, tuple[str, dict, sp.MaskSet]]:
    out = {f"csr {s:.0%}": ("csr", {}, sp.prune(mlp, "l1_unstructured", amount=s)) for s in (0.5, 0.7, 0.9)}
    out["2:4"] = ("2:4", {}, sp.prune(mlp, "nm", pattern="2:4"))
    out["bsr 4x1 90%"] = ("bsr", {"block": (4, 1)}, block_masks(mlp, 0.9, (4, 1)))
    return out


def bench(m: int, rounds: int, gen: torch.Generator) -> list[dict]:
    holder = torch.nn.Sequential(Mlp(768, 3072)).eval()  # timm's Mlp: what sparse_prune fuses
    with torch.no_grad():
        for p in holder.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * (p.shape[-1] ** -0.5 if p.dim() == 2 else 0.1))
    holder.requires_grad_(False)
    x = torch.randn(m, 768, generator=gen)
    fns, info = {"dense": lambda: holder(x)}, {}
    for label, (fmt, kw, masks) in mask_sets(holder).items():
        fused = sp.convert(holder, masks, format=fmt, **kw)
        two = sp.convert(holder, masks, format=fmt, fuse_activations=False, **kw)
        fuse_gelu(two)
        assert isinstance(fused[0], sp.SparseMLP) and not isinstance(two[0], sp.SparseMLP)
        masked = masks.apply(copy.deepcopy(holder))
        ref = copy.deepcopy(masked).double()(x.double())
        kept = sum(int(mask.sum()) for _, mask in masks.items())
        for kind, module in (("fused", fused), ("two ops", two)):
            with torch.inference_mode():
                got = module(x)
            check = agreement.check_matches(got, ref, masked(x), f"{label} {kind}")
            key = f"{label} {kind}"
            fns[key] = lambda mod=module: mod(x)
            info[key] = {"set": label, "format": fmt, "kind": kind, "kept": kept, "error": check.get("error"),
                         "kernel": sp.report(module)[0]["kernel"]}
    samples = time_samples(fns, "cpu", warmup=2, reps=rounds)
    dense = spread(samples["dense"])
    rows = []
    for key, ts in samples.items():
        t = spread(ts)
        meta = info.get(key, {"set": "dense", "format": "dense", "kind": "dense", "kept": 2 * 768 * 3072, "error": None,
                              "kernel": "F.linear (MKL) + F.gelu"})
        rows.append({"M": m, "variant": key, **meta, "ms": t["median"], "q1_ms": t["q1"], "q3_ms": t["q3"],
                     "dense_ms": dense["median"], "speedup": dense["median"] / t["median"],
                     "useful_gflops": 2 * m * meta["kept"] / t["median"] / 1e6})
    return rows


def write(rows: list[dict], meta: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "mlp.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    lines = [f"ViT-B/16 MLP block (768→3072, GELU, 3072→768), fp32, {meta['device']}, {meta['threads']} threads, "
             f"torch {meta['torch']}, commit {meta['commit']}; median of {meta['rounds']} rotating rounds (q1-q3), "
             "speedup = dense ms / variant ms in the same rounds.", ""]
    for m in dict.fromkeys(r["M"] for r in rows):
        lines += [f"### M = {m}", "", "| variant | kernel | ms [q1-q3] | speedup | useful GFLOP/s |", "|---|---|---|---|---|"]
        lines += [f"| {r['variant']} | {r['kernel']} | {r['ms']:.3f} [{r['q1_ms']:.3f}-{r['q3_ms']:.3f}] | "
                  f"{r['speedup']:.2f}x | {r['useful_gflops']:.0f} |" for r in rows if r["M"] == m]
        lines.append("")
    (out / "mlp.md").write_text("\n".join(lines))
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    ms = list(dict.fromkeys(r["M"] for r in rows))
    sets = list(dict.fromkeys(r["set"] for r in rows if r["kind"] != "dense"))
    fig, axes = plt.subplots(1, len(ms), figsize=(6 * len(ms), 4.2), squeeze=False)
    for ax, m in zip(axes[0], ms, strict=True):
        for i, kind in enumerate(("two ops", "fused")):
            part = {r["variant"]: r for r in rows if r["M"] == m}
            ys = [part[f"{s} {kind}"] for s in sets]
            err = [[r["speedup"] - r["dense_ms"] / r["q3_ms"] for r in ys], [r["dense_ms"] / r["q1_ms"] - r["speedup"] for r in ys]]
            ax.bar([j + 0.4 * i for j in range(len(sets))], [r["speedup"] for r in ys], 0.4, yerr=err, capsize=3,
                   label=kind)
        ax.axhline(1.0, color="black", linewidth=0.8)
        ax.set_xticks([j + 0.2 for j in range(len(sets))], sets, rotation=20)
        ax.set_ylabel("speedup vs dense (median, q1-q3)")
        ax.set_title(f"ViT-B/16 MLP, M = {m}, fp32, {meta['threads']} threads\n{meta['device']}", fontsize=9)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "mlp.png", dpi=120)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--m", type=int, nargs="+", default=[197, 1576])
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    gen = torch.Generator().manual_seed(0)
    meta = {"device": _cpu_name(), "threads": args.threads, "torch": torch.__version__, "commit": git_commit(),
            "python": platform.python_version(), "cpu_isa": sp.ops.cpu_isa(), "rounds": args.rounds}
    rows = [r for m in args.m for r in bench(m, args.rounds, gen)]
    out = Path(args.out or f"benchmarks/results/cpu-{cpu_slug()}")
    write(rows, meta, out)
    print((out / "mlp.md").read_text())


if __name__ == "__main__":
    main()
