"""What limits our CPU kernels per GEMM: a cost per call that does not shrink with the weights, and the inner loop against the FMA peak.

Usage: ``python benchmarks/cpu_limits.py [--m 197 1576] [--shapes fc1 fc2 qkv proj] [--rounds 11]
[--threads 2] [--tag NAME] [--out benchmarks/results/cpu-<cpu>]``;
``python benchmarks/cpu_limits.py --rederive limits.json`` rebuilds a run's derived columns and
Markdown from its stored timings.

For every ViT-B/16 GEMM shape and token count M, one interleaved set (rotating rounds, medians)
times dense ``F.linear`` (MKL), our ``csr`` at 50/60/70/80/85/90/95% (L1 unstructured), ``2:4``,
and the same layer at 99.9% (the probe: it packs X into panels, walks the rows of the first
sub-block, runs the Yᵀ → Y epilogue and pays the module call and thread hand-off, but multiplies
almost nothing). Each variant is timed two ways in the same rounds: "cold", its first call, right
after the previous variant's calls, and "warm", the mean of the next three calls.

The fixed cost of a call is bracketed two ways. The probe's warm time is a lower estimate (a
90% call walks more non-empty segments). A least-squares line through the warm csr times against
the stored weights, t = fixed + kept / rate, gives an upper estimate (its intercept: the
per-(row, sub-block) bookkeeping shrinks as segments empty out, so the highest sparsities sit
below the line) and a **marginal rate** (useful GFLOP/s of each further weight, 2·M / slope), put
beside the FMA peak that ``benchmarks/fma_peak.c`` measures (compiled here with ``cc``; None where
that fails) for the kernels' vector width and thread count. Per variant: its speedup (warm and
cold), the fixed share of its warm time and the speedup it would have without the fixed cost
(dense / (t − fixed)), each as probe–fit.

Every sparse layer is built with the public API and checked against the masked dense product
before timing. Writes ``limits[_<tag>].json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import json
import platform
import re
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as Fn
from torch import nn
from tqdm import tqdm

import sparse_prune as sp
from sparse_prune import agreement
from sparse_prune.bench.latency import random_linear
from sparse_prune.timing import _cpu_name, cpu_slug, git_commit, spread, time_samples

SHAPES = {"qkv": (2304, 768), "proj": (768, 768), "fc1": (3072, 768), "fc2": (768, 3072)}  # (N, K)
FIT = [0.5, 0.6, 0.7, 0.8, 0.85, 0.9, 0.95]  # the sparsities the line is fitted through
PROBE = 0.999


def fma_peak(isa: str, threads: int) -> float | None:
    """GFLOP/s of ``fma_peak.c`` for the kernels' vector width at ``threads`` threads, or None
    where it cannot be built or run (no C compiler, not x86-64, the portable ISA)."""
    flags = {"avx2": ["-mavx2", "-mfma"], "avx512": ["-mavx512f", "-DWIDTH=512"]}.get(isa)
    cc = shutil.which("cc") or shutil.which("gcc")
    if flags is None or cc is None:
        return None
    src = Path(__file__).with_name("fma_peak.c")
    with tempfile.TemporaryDirectory() as tmp:
        exe = Path(tmp) / "fma_peak"
        try:
            subprocess.run([cc, "-O2", *flags, "-fopenmp", str(src), "-o", str(exe)], check=True,
                           capture_output=True, timeout=120)
            out = subprocess.run([str(exe), str(threads)], check=True, capture_output=True, text=True,
                                 timeout=300).stdout
        except (OSError, subprocess.SubprocessError):
            return None
    found = re.findall(rf"threads={threads} gflops=([0-9.]+)", out)
    return float(found[-1]) if found else None


def rounds_cold_warm(fns: dict, rounds: int, repeat: int = 3) -> tuple[dict, dict]:
    """Per callable, milliseconds of its first call in each round ("cold": right after the
    previous callable's calls) and the mean of the next ``repeat`` calls ("warm": its own data in
    cache, the threads awake), in time_samples' rotating rounds (its warm-up round dropped)."""
    cold: dict[str, list[float]] = {k: [] for k in fns}
    warm: dict[str, list[float]] = {k: [] for k in fns}

    def split(name, fn):
        def call():
            t0 = time.perf_counter()
            fn()
            t1 = time.perf_counter()
            for _ in range(repeat):
                fn()
            cold[name].append((t1 - t0) * 1e3)
            warm[name].append((time.perf_counter() - t1) * 1e3 / repeat)
        return call

    time_samples({name: split(name, fn) for name, fn in fns.items()}, "cpu", warmup=1, reps=rounds)
    return {k: v[1:] for k, v in cold.items()}, {k: v[1:] for k, v in warm.items()}


def upgrade(rows: list[dict]) -> list[dict]:
    """Rows of a run written before the probe bracketed the fixed cost (bf51fca): the fit / probe
    flags from the variant names, and the one-sided columns dropped (derive writes both sides)."""
    for r in rows:
        if r["variant"] != "dense" and "fit" not in r:
            csr = r["variant"].startswith("csr")
            r["fit"] = csr and r.get("sparsity") in FIT
            r["probe"] = csr and r.get("sparsity") == PROBE
        r.pop("fixed_share", None)
        r.pop("speedup_without_fixed", None)
    return rows


def line(xs: list[float], ys: list[float]) -> tuple[float, float]:
    """Least-squares intercept and slope of ys against xs."""
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / sum((x - mx) ** 2 for x in xs)
    return my - slope * mx, slope


def bench_shape(name: str, m: int, rounds: int, gen: torch.Generator) -> list[dict]:
    n, k = SHAPES[name]
    lin = random_linear(n, k, gen)
    holder = nn.Sequential(lin)
    x = torch.randn(m, k, generator=gen)
    grid = {}
    for s in [*FIT, PROBE]:
        masks = sp.prune(holder, "l1_unstructured", amount=s)
        label = f"csr {s:.1%}" if s == PROBE else f"csr {s:.0%}"
        grid[label] = (s, sp.convert(holder, masks, format="csr"), lin.weight * masks["0.weight"])
    masks = sp.prune(holder, "nm", pattern="2:4")
    grid["2:4"] = (0.5, sp.convert(holder, masks, format="2:4"), lin.weight * masks["0.weight"])
    fns = {"dense": lambda: Fn.linear(x, lin.weight, lin.bias)}
    for label, (_, module, masked) in grid.items():
        ref = Fn.linear(x.double(), masked.double(), lin.bias.double())
        with torch.inference_mode():
            got = module(x)
        agreement.check_matches(got, ref, Fn.linear(x, masked, lin.bias), label)
        fns[label] = lambda mod=module: mod(x)
    cold, warm = rounds_cold_warm(fns, rounds)
    med = {label: spread(ts)["median"] for label, ts in warm.items()}
    kept = {label: int((masked != 0).sum()) for label, (_, _, masked) in grid.items()}
    cold_med = {label: spread(ts)["median"] for label, ts in cold.items()}
    rows = [{"shape": name, "N": n, "K": k, "M": m, "variant": "dense", "kernel": "F.linear (MKL)", "ms": med["dense"],
             "cold_ms": cold_med["dense"]}]
    for label, (sparsity, module, _) in grid.items():
        rows.append({"shape": name, "N": n, "K": k, "M": m, "variant": label, "sparsity": sparsity,
                     "kernel": sp.report(module)[0]["kernel"], "kept": kept[label], "ms": med[label],
                     "cold_ms": cold_med[label], "fit": label.startswith("csr") and sparsity in FIT,
                     "probe": label.startswith("csr") and sparsity == PROBE})
    return derive(rows)


def derive(rows: list[dict]) -> list[dict]:
    """Adds to one (shape, M)'s measured rows (dense first) what follows from their timings:
    speedups, useful GFLOP/s, the probe and the fitted line (on the dense row), and per fitted
    variant its fixed share and speedup without the fixed cost, by the probe and by the fit."""
    dense, m = rows[0], rows[0]["M"]
    fitted = [r for r in rows if r.get("fit")]
    probe = next((r["ms"] for r in rows if r.get("probe")), None)
    fixed, per_weight = line([r["kept"] for r in fitted], [r["ms"] for r in fitted])
    dense.update(speedup=1.0, cold_speedup=1.0, useful_gflops=2 * m * dense["N"] * dense["K"] / dense["ms"] / 1e6,
                 probe_ms=probe, fit_fixed_ms=fixed,
                 fit_marginal_gflops=2 * m * 1e-6 / per_weight if per_weight > 0 else None)
    for r in rows[1:]:
        t = r["ms"]
        r.update(speedup=dense["ms"] / t, cold_speedup=dense["cold_ms"] / r["cold_ms"],
                 useful_gflops=2 * m * r["kept"] / t / 1e6)
        for key, f in (("probe", probe), ("fit", fixed)):
            ok = r.get("fit") and f is not None
            r[f"fixed_share_{key}"] = f / t if ok else None
            r[f"speedup_without_fixed_{key}"] = dense["ms"] / (t - f) if ok and t > f else None
    return rows


def span_of(low: float | None, high: float | None, fmt: str) -> str:
    """ "low-high" in ``fmt`` (one value when both print alike, "-" when neither is known)."""
    texts = [fmt.format(v) for v in (low, high) if v is not None]
    return "-" if not texts else texts[0] if len(set(texts)) == 1 else "-".join(texts)


def write(rows: list[dict], meta: dict, out: Path, stem: str) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{stem}.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    peak = meta["fma_peak_gflops"]
    lines = [f"Per-GEMM limits, fp32, {meta['device']}, {meta['threads']} threads, CPU kernels {meta['cpu_isa']}, "
             f"torch {meta['torch']}, commit {meta['commit']}; median of {meta['rounds']} rotating rounds. "
             f"FMA peak ({meta['vector']}, {meta['threads']} threads, benchmarks/fma_peak.c): "
             + (f"{peak:.0f} GFLOP/s." if peak else "not measured.")
             + " Warm: mean of 3 calls after a first one; cold: that first call, right after another variant."
             " Fixed cost: the probe (csr 99.9%, lower estimate) and the intercept of the line t = fixed + kept / rate"
             f" through the warm csr times at {', '.join(f'{s:.0%}' for s in FIT)} (upper estimate; its slope gives the"
             " marginal rate).", "",
             "| GEMM, M | dense ms | dense GFLOP/s | probe ms | fit intercept ms | fixed / dense (probe-fit) "
             "| marginal GFLOP/s (fit) | marginal / peak | dense / peak |", "|---|---|---|---|---|---|---|---|---|"]
    pct = (lambda v: f"{v:.0%}") if peak else (lambda v: "-")
    for r in rows:
        if r["variant"] != "dense":
            continue
        rate, probe = r["fit_marginal_gflops"], r["probe_ms"]
        cells = [f"{r['shape']}, {r['M']}", f"{r['ms']:.3f}", f"{r['useful_gflops']:.0f}",
                 f"{probe:.3f}" if probe is not None else "-", f"{r['fit_fixed_ms']:.3f}",
                 span_of(probe / r["ms"] if probe is not None else None, r["fit_fixed_ms"] / r["ms"], "{:.1%}"),
                 f"{rate:.0f}" if rate else "-", pct(rate / peak) if rate and peak else "-",
                 pct(r["useful_gflops"] / peak) if peak else "-"]
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    for (shape, m) in dict.fromkeys((r["shape"], r["M"]) for r in rows):
        part = [r for r in rows if r["shape"] == shape and r["M"] == m and r["variant"] != "dense"]
        lines += [f"### {shape} [{part[0]['N']}x{part[0]['K']}], M = {m}", "",
                  "| variant | kernel | warm ms | warm speedup | useful GFLOP/s | fixed share (probe-fit) "
                  "| speedup without the fixed cost (probe-fit) | cold ms | cold speedup |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for r in part:
            cells = [r["variant"], r["kernel"], f"{r['ms']:.3f}", f"{r['speedup']:.2f}x", f"{r['useful_gflops']:.0f}",
                     span_of(r["fixed_share_probe"], r["fixed_share_fit"], "{:.0%}"),
                     span_of(r["speedup_without_fixed_probe"], r["speedup_without_fixed_fit"], "{:.2f}x"),
                     f"{r['cold_ms']:.3f}", f"{r['cold_speedup']:.2f}x"]
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    path = out / f"{stem}.md"
    path.write_text("\n".join(lines))
    return path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--m", type=int, nargs="+", default=[197, 1576])
    ap.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    ap.add_argument("--rounds", type=int, default=11)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--tag", default="", help="write limits_<tag>.* instead of limits.*")
    ap.add_argument("--out", default=None)
    ap.add_argument("--rederive", metavar="JSON", default=None,
                    help="rebuild the derived columns and the Markdown of a run from its stored timings")
    args = ap.parse_args()
    if args.rederive:
        path = Path(args.rederive)
        run = json.loads(path.read_text())
        rows = []
        for key in dict.fromkeys((r["shape"], r["M"]) for r in run["rows"]):
            rows += derive(upgrade([r for r in run["rows"] if (r["shape"], r["M"]) == key]))
        print(write(rows, run["meta"], path.parent, path.stem).read_text())
        return
    torch.set_num_threads(args.threads)
    gen = torch.Generator().manual_seed(0)
    isa = sp.ops.cpu_isa()
    peak = fma_peak(isa, args.threads)
    meta = {"device": _cpu_name(), "threads": args.threads, "torch": torch.__version__, "commit": git_commit(),
            "python": platform.python_version(), "cpu_isa": isa, "rounds": args.rounds,
            "vector": {"avx2": "ymm", "avx512": "zmm"}.get(isa, isa), "fma_peak_gflops": peak}
    rows = []
    for name in tqdm(args.shapes, desc="shapes"):
        for m in args.m:
            rows += bench_shape(name, m, args.rounds, gen)
    out = Path(args.out or f"benchmarks/results/cpu-{cpu_slug()}")
    print(write(rows, meta, out, f"limits_{args.tag}" if args.tag else "limits").read_text())


if __name__ == "__main__":
    main()
