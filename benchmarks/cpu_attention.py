"""ViT-B/16's attention (12 heads, 197 tokens, head dim 64) on the CPU: our kernel against torch's SDPA.

Usage: ``python benchmarks/cpu_attention.py [--batches 1 8] [--rounds 15] [--threads 2] [--out DIR]
[--e2e 0.5 0.7 0.9 [--e2e-rounds 7]]``.

For each batch one interleaved set (rotating rounds, medians, quartiles) times what a
transformers ViT layer runs between its q/k/v projections and its output projection: the heads
as views of [B, 197, 768], attention, the heads merged back into [B, 197, 768] contiguous.
``torch sdpa`` is ``F.scaled_dot_product_attention`` (its CPU flash kernel) then the merge copy;
``ours <isa>`` is ``sparse_prune::attention`` with that ISA forced (SPARSE_PRUNE_CPU_ISA, set by
every variant, torch's included, before its call), whose output is already in the merged
layout. Every output is checked against float64 first. Writes ``attention.json``,
``attention.md`` and ``attention.png``.

``--e2e``: ViT-B/16 (transformers, random weights) end to end at batch 1 instead, one rotating set
of every model: dense and csr (L1 unstructured at each sparsity given) with torch's sdpa and with
ours (``sp.set_attention``), so the speedup against dense with the same attention and what our
attention adds are read from the same rounds. Each converted model is checked against its masked
dense model first. Writes ``attention_e2e.json`` and ``attention_e2e.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
from pathlib import Path

import torch
import torch.nn.functional as F

import sparse_prune as sp
from sparse_prune import agreement
from sparse_prune.timing import _cpu_name, cpu_slug, git_commit, spread, time_samples

HEADS, TOKENS, HEAD_DIM = 12, 197, 64


def _with_isa(isa: str, fn):
    def run():
        os.environ["SPARSE_PRUNE_CPU_ISA"] = isa
        return fn()
    return run


def bench(batch: int, rounds: int, gen: torch.Generator) -> list[dict]:
    x = [torch.randn(batch, TOKENS, HEADS * HEAD_DIM, generator=gen) for _ in range(3)]
    q, k, v = (t.view(batch, TOKENS, HEADS, HEAD_DIM).transpose(1, 2) for t in x)
    merged = (batch, TOKENS, HEADS * HEAD_DIM)
    ref = F.scaled_dot_product_attention(q.double(), k.double(), v.double()).transpose(1, 2).reshape(merged)
    fns = {"torch sdpa": _with_isa("auto", lambda: F.scaled_dot_product_attention(q, k, v).transpose(1, 2)
                                   .contiguous().view(merged))}
    for isa in (isa for isa in sp.ops.cpu_isas() if isa != "portable"):  # portable: torch's SDPA
        fns[f"ours {isa}"] = _with_isa(isa, lambda: sp.attention.attention(q, k, v).transpose(1, 2).view(merged))
    errors = {}
    with torch.inference_mode():
        for key, fn in fns.items():
            err = (fn().double() - ref).abs().max().item()
            if not err < 1e-5:
                raise SystemExit(f"{key}: max error {err:.3g} against float64")
            errors[key] = err
    samples = time_samples(fns, "cpu", warmup=3, reps=rounds)
    os.environ.pop("SPARSE_PRUNE_CPU_ISA", None)
    base = spread(samples["torch sdpa"])["median"]
    flops = 4 * batch * HEADS * TOKENS * TOKENS * HEAD_DIM
    rows = []
    for key, ts in samples.items():
        t = spread(ts)
        rows.append({"batch": batch, "variant": key, "ms": t["median"], "q1_ms": t["q1"], "q3_ms": t["q3"],
                     "torch_ms": base, "speedup": base / t["median"], "gflops": flops / t["median"] / 1e6,
                     "max_error": errors[key]})
    return rows


def write(rows: list[dict], meta: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "attention.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    lines = [f"ViT-B/16 attention ({HEADS} heads x {TOKENS} tokens x {HEAD_DIM}, heads split from and merged into "
             f"[B, {TOKENS}, {HEADS * HEAD_DIM}]), fp32, {meta['device']}, {meta['threads']} threads, "
             f"torch {meta['torch']}, commit {meta['commit']}; median of {meta['rounds']} rotating rounds (q1-q3), "
             "speedup = torch sdpa ms / variant ms in the same rounds.", ""]
    for b in dict.fromkeys(r["batch"] for r in rows):
        lines += [f"### batch {b}", "", "| variant | ms [q1-q3] | speedup | GFLOP/s | max error vs fp64 |",
                  "|---|---|---|---|---|"]
        lines += [f"| {r['variant']} | {r['ms']:.3f} [{r['q1_ms']:.3f}-{r['q3_ms']:.3f}] | {r['speedup']:.2f}x | "
                  f"{r['gflops']:.0f} | {r['max_error']:.1e} |" for r in rows if r["batch"] == b]
        lines.append("")
    (out / "attention.md").write_text("\n".join(lines))
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    batches = list(dict.fromkeys(r["batch"] for r in rows))
    variants = list(dict.fromkeys(r["variant"] for r in rows))
    fig, ax = plt.subplots(figsize=(7, 4.2))
    width = 0.8 / len(variants)
    for i, name in enumerate(variants):
        ys = [next(r for r in rows if r["batch"] == b and r["variant"] == name) for b in batches]
        err = [[r["gflops"] - r["gflops"] * r["ms"] / r["q3_ms"] for r in ys],
               [r["gflops"] * r["ms"] / r["q1_ms"] - r["gflops"] for r in ys]]
        ax.bar([j + width * i for j in range(len(batches))], [r["gflops"] for r in ys], width, yerr=err, capsize=3,
               label=name)
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(batches))], [f"batch {b}" for b in batches])
    ax.set_ylabel("GFLOP/s (median, q1-q3)")
    ax.set_title(f"ViT-B/16 attention, fp32, {meta['threads']} threads\n{meta['device']}", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "attention.png", dpi=120)


def bench_e2e(sparsities: list[float], rounds: int) -> list[dict]:
    import copy

    torch.manual_seed(0)
    base = sp.models.vit("vit_base_patch16_224", source="transformers").eval()
    x = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(1))
    fns, info = {}, {}
    for att in ("sdpa", "sparse_prune"):
        dense = sp.set_attention(copy.deepcopy(base), att)
        fns[f"dense/{att}"], info[f"dense/{att}"] = (lambda m=dense: m(x)), {"format": "dense", "sparsity": 0.0}
        for s in sparsities:
            masks = sp.prune(dense, "l1_unstructured", amount=s)
            masked = masks.apply(copy.deepcopy(dense))
            fast = sp.convert(dense, masks, format="csr")
            with torch.inference_mode():
                ref = copy.deepcopy(masked).double()(x.double()).logits
                agreement.check_matches(fast(x).logits, ref, masked(x).logits, f"csr {s} {att}")
            key = f"csr {s:.0%}/{att}"
            fns[key], info[key] = (lambda m=fast: m(x)), {"format": "csr", "sparsity": s}
    with torch.inference_mode():
        samples = time_samples(fns, "cpu", warmup=2, reps=rounds)
    med = {key: spread(ts) for key, ts in samples.items()}
    rows = []
    for key, t in med.items():
        att = key.split("/")[1]
        rows.append({"variant": key, "attention": att, **info[key], "ms": t["median"], "q1_ms": t["q1"],
                     "q3_ms": t["q3"], "vs_dense_same_attention": med[f"dense/{att}"]["median"] / t["median"],
                     "vs_dense_sdpa": med["dense/sdpa"]["median"] / t["median"]})
    return rows


def write_e2e(rows: list[dict], meta: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "attention_e2e.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    lines = [f"ViT-B/16 (transformers, random weights), batch 1, fp32, {meta['device']}, {meta['threads']} threads, "
             f"CPU kernels {meta['cpu_isa']}, torch {meta['torch']}, commit {meta['commit']}; every model in one set of "
             f"{meta['rounds']} rotating rounds, median (q1-q3).", "",
             "| model | attention | ms (q1-q3) | vs dense, same attention | vs dense with sdpa |", "|---|---|---|---|---|"]
    lines += [f"| {r['variant'].split('/')[0]} | {r['attention']} | {r['ms']:.1f} ({r['q1_ms']:.1f}-{r['q3_ms']:.1f}) | "
              f"{r['vs_dense_same_attention']:.2f}x | {r['vs_dense_sdpa']:.2f}x |" for r in rows]
    (out / "attention_e2e.md").write_text("\n".join(lines) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=None)
    ap.add_argument("--e2e", type=float, nargs="+", default=None, metavar="SPARSITY")
    ap.add_argument("--e2e-rounds", type=int, default=7)
    args = ap.parse_args()
    if not sp.ops.has_cpu_extension():
        raise SystemExit(f"our CPU kernels are not loaded: {sp.ops.cpu_extension_error()}")
    torch.set_num_threads(args.threads)
    gen = torch.Generator().manual_seed(0)
    meta = {"device": _cpu_name(), "threads": args.threads, "torch": torch.__version__, "commit": git_commit(),
            "python": platform.python_version(), "cpu_isas": sp.ops.cpu_isas(), "rounds": args.rounds}
    out = Path(args.out or f"benchmarks/results/cpu-{cpu_slug()}")
    if args.e2e:
        meta.update(cpu_isa=sp.ops.cpu_isa(), rounds=args.e2e_rounds)
        write_e2e(bench_e2e(args.e2e, args.e2e_rounds), meta, out)
        print((out / "attention_e2e.md").read_text())
        return
    rows = [r for b in args.batches for r in bench(b, args.rounds, gen)]
    write(rows, meta, out)
    print((out / "attention.md").read_text())


if __name__ == "__main__":
    main()
