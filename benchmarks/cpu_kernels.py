"""Per-GEMM speed of our CPU kernels against dense ``F.linear`` (MKL), in one process.

Usage: ``python benchmarks/cpu_kernels.py [--m 197 1576] [--shapes fc1 fc2 qkv proj]
[--rounds 15] [--threads 2] [--out benchmarks/results/cpu-<cpu>]``.

For every ViT-B/16 GEMM shape and token count M, one interleaved set (rotating rounds, medians,
quartiles) times: dense ``F.linear`` on the unpruned weight; our ``csr`` at 50/70/90%
L1-unstructured sparsity; ``2:4`` (magnitude); ``bsr`` at 90% with each block shape a CPU wants
(whole blocks kept by L2 norm); and MKL's ``torch.sparse.mm`` on the 90% CSR weight (the
candidate we replaced). Every sparse layer is built with the public API
(``sp.convert(nn.Sequential(linear), masks, format=...)``), so the Python module call is
counted, and its output is checked against the masked dense product before timing. Rows carry
the ratio vs dense, useful GFLOP/s (2·M·kept weights / time) beside dense GFLOP/s (2·M·N·K / time),
and the kernel ``sp.report`` names. Writes ``gemm.json``, ``gemm.md`` and ``gemm.png``.
"""

from __future__ import annotations

import argparse
import json
import platform
import warnings
from pathlib import Path

import torch
import torch.nn.functional as Fn
from torch import nn
from tqdm import tqdm

import sparse_prune as sp
from sparse_prune import agreement
from sparse_prune.bench.latency import block_masks, random_linear
from sparse_prune.timing import _cpu_name, cpu_slug, git_commit, spread, time_samples

SHAPES = {"qkv": (2304, 768), "proj": (768, 768), "fc1": (3072, 768), "fc2": (768, 3072)}  # (N, K)
BLOCKS = [(1, 4), (4, 1), (8, 1), (1, 8), (16, 1), (4, 4), (16, 16), (32, 32)]
UNSTRUCTURED = [0.5, 0.7, 0.9]


def variants(lin: nn.Linear) -> dict[str, tuple[str, float, nn.Module | None, torch.Tensor]]:
    """label -> (format, sparsity, converted module, masked dense weight)."""
    out = {}
    holder = nn.Sequential(lin)
    for s in UNSTRUCTURED:
        masks = sp.prune(holder, "l1_unstructured", amount=s)
        out[f"csr {s:.0%}"] = ("csr", s, sp.convert(holder, masks, format="csr"), lin.weight * masks["0.weight"])
    masks = sp.prune(holder, "nm", pattern="2:4")
    out["2:4"] = ("2:4", 0.5, sp.convert(holder, masks, format="2:4"), lin.weight * masks["0.weight"])
    for block in BLOCKS:
        masks = block_masks(holder, 0.9, block)
        out[f"bsr {block[0]}x{block[1]} 90%"] = ("bsr", 0.9, sp.convert(holder, masks, format="bsr", block=block),
                                                lin.weight * masks["0.weight"])
    return out


def mkl_csr(weight: torch.Tensor, bias: torch.Tensor):
    """torch.sparse (MKL) on the same CSR weight: y = (W·xᵀ)ᵀ + b."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
        w = weight.to_sparse_csr()
    return lambda x: torch.sparse.mm(w, x.t()).t().add_(bias)


def bench_shape(name: str, m: int, rounds: int, gen: torch.Generator) -> list[dict]:
    n, k = SHAPES[name]
    lin = random_linear(n, k, gen)
    x = torch.randn(m, k, generator=gen)
    grid = variants(lin)
    fns = {"dense": lambda: Fn.linear(x, lin.weight, lin.bias)}
    checked = {}
    for label, (_, _, module, masked) in grid.items():
        ref = Fn.linear(x.double(), masked.double(), lin.bias.double())
        with torch.inference_mode():
            got = module(x)
        checked[label] = agreement.check_matches(got, ref, Fn.linear(x, masked, lin.bias), label)
        fns[label] = lambda mod=module: mod(x)
    w90 = grid["csr 90%"][3]
    mkl = mkl_csr(w90, lin.bias)
    fns["mkl csr 90%"] = lambda: mkl(x)
    samples = time_samples(fns, "cpu", warmup=2, reps=rounds)
    dense = spread(samples["dense"])
    rows = []
    for label, ts in samples.items():
        t = spread(ts)
        if label == "dense":
            fmt, sparsity, kept, kernel = "dense", 0.0, n * k, "F.linear (MKL)"
        elif label.startswith("mkl"):
            fmt, sparsity, kept, kernel = "csr", 0.9, int((w90 != 0).sum()), "torch.sparse.mm (MKL)"
        else:
            fmt, sparsity, module, masked = grid[label]
            kept, kernel = int((masked != 0).sum()), sp.report(module)[0]["kernel"]
        rows.append({
            "shape": name, "N": n, "K": k, "M": m, "variant": label, "format": fmt, "sparsity": sparsity,
            "kernel": kernel, "ms": t["median"], "q1_ms": t["q1"], "q3_ms": t["q3"], "dense_ms": dense["median"],
            "speedup": dense["median"] / t["median"],
            "useful_gflops": 2 * m * kept / t["median"] / 1e6, "dense_gflops": 2 * m * n * k / dense["median"] / 1e6,
            "error": checked.get(label, {}).get("error"),
        })
    return rows


def write(rows: list[dict], meta: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "gemm.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    lines = [f"Per-GEMM, fp32, {meta['device']}, {meta['threads']} threads, torch {meta['torch']}, "
             f"commit {meta['commit']}; median of {meta['rounds']} rotating rounds (q1-q3 in brackets), "
             "speedup = dense F.linear ms / variant ms in the same rounds.", ""]
    for (shape, m) in dict.fromkeys((r["shape"], r["M"]) for r in rows):
        part = [r for r in rows if r["shape"] == shape and r["M"] == m]
        lines += [f"### {shape} [{part[0]['N']}x{part[0]['K']}], M = {m}", "",
                  "| variant | kernel | ms [q1-q3] | speedup | useful GFLOP/s | dense GFLOP/s |", "|---|---|---|---|---|---|"]
        lines += [f"| {r['variant']} | {r['kernel']} | {r['ms']:.3f} [{r['q1_ms']:.3f}-{r['q3_ms']:.3f}] | "
                  f"{r['speedup']:.2f}x | {r['useful_gflops']:.0f} | {r['dense_gflops']:.0f} |" for r in part]
        lines.append("")
    (out / "gemm.md").write_text("\n".join(lines))
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    combos = list(dict.fromkeys((r["shape"], r["M"]) for r in rows))
    labels = [r["variant"] for r in rows if (r["shape"], r["M"]) == combos[0] and r["variant"] != "dense"]
    fig, ax = plt.subplots(figsize=(max(8, 1.1 * len(labels)), 4.5))
    width = 0.8 / len(combos)
    for i, combo in enumerate(combos):
        part = {r["variant"]: r for r in rows if (r["shape"], r["M"]) == combo}
        xs = [j + i * width for j in range(len(labels))]
        ys = [part[v]["speedup"] for v in labels]
        err = [[part[v]["speedup"] - part[v]["dense_ms"] / part[v]["q3_ms"] for v in labels],
               [part[v]["dense_ms"] / part[v]["q1_ms"] - part[v]["speedup"] for v in labels]]
        ax.bar(xs, ys, width, yerr=err, capsize=2, label=f"{combo[0]}, M={combo[1]}")
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(labels))], labels, rotation=30, ha="right")
    ax.set_ylabel("speedup vs dense F.linear (median, q1-q3)")
    ax.set_title(f"Per-GEMM fp32, {meta['device']}, {meta['threads']} threads")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(out / "gemm.png", dpi=120)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--m", type=int, nargs="+", default=[197, 1576])
    ap.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    gen = torch.Generator().manual_seed(0)
    cpu = _cpu_name()
    meta = {"device": cpu, "threads": args.threads, "torch": torch.__version__, "commit": git_commit(),
            "python": platform.python_version(), "cpu_isa": sp.ops.cpu_isa(), "rounds": args.rounds}
    rows = []
    for name in tqdm(args.shapes, desc="shapes"):
        for m in args.m:
            rows += bench_shape(name, m, args.rounds, gen)
    out = Path(args.out or f"benchmarks/results/cpu-{cpu_slug()}")
    write(rows, meta, out)
    print((out / "gemm.md").read_text())


if __name__ == "__main__":
    main()
