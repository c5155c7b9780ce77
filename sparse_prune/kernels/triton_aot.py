"""Compile every Triton kernel of ours ahead of time for sm_80 and sm_90, without a GPU.

``triton.compile(ASTSource(fn, signature, constexprs), target=GPUTarget("cuda", arch, 32))``
runs Triton's whole pipeline and ptxas on the CPU and returns the cubin, its PTX and
``metadata.shared``. One *variant* is a kernel x autotune config x dtype x flag (GELU, BSR
block) x arch; :func:`variants` lists them all (``fast=True``: a representative subset, one
per kernel x dtype x arch: the config with the largest shared-memory estimate that the pruner
keeps there), :func:`compile_variant` compiles one and reports what a GPU would check first:

* ``shared``: bytes Triton allocates; ``limit``: the SM's opt-in limit (:data:`SMEM_LIMITS`);
  ``estimate``: the kernel's own ``smem_estimate`` (what the autotune pruner uses);
* ``kept``: the pruner keeps the config on that arch for that dtype (``estimate <= limit``);
* ``mma``: ``"wgmma"``, ``"mma"`` or ``""``: the tensor-core instruction in the PTX;
* ``regs``, ``spills``: registers per thread and bytes of local memory (``cuobjdump -res-usage``
  of the cubin; -1 when Triton's wheel has no cuobjdump).

Run as ``python -m sparse_prune.kernels.triton_aot [--fast] [--jobs N] [--json FILE]`` (what
``make gpu-compile`` and tests/test_gpu_compile.py do): it compiles in a process pool, prints
one line per variant and a summary, and exits 1 when a variant fails a check
(:func:`problems`). The CLI clears ``TRITON_INTERPRET`` before importing Triton: the
interpreter replaces ``@triton.jit`` functions and cannot compile. Compiled kernels land in
Triton's cache (``TRITON_CACHE_DIR``, default ``~/.triton/cache``), keyed by the kernel's
source hash, options and target: a rerun with unchanged kernels compiles nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field

DTYPES = ("float16", "bfloat16", "float32")
_TRITON_TY = {"float16": "fp16", "bfloat16": "bf16", "float32": "fp32"}
KERNELS = ("semi24", "shrunk", "csr", "bsr")
BSR_BLOCKS = ((16, 16), (32, 32), (64, 64))
# Kernels whose inner product is a tl.dot: tensor cores expected in fp16/bf16. fp32 multiplies
# in full precision (input_precision="ieee", as F.linear with TF32 off): FMA, no MMA.
DOT_KERNELS = ("semi24", "shrunk", "bsr")


@dataclass(frozen=True)
class Variant:
    kernel: str
    config: int  # index into the module's FULL_CONFIGS + UNTUNED_CONFIGS
    dtype: str
    arch: int
    gelu: bool
    block: tuple[int, int] | None = None  # bsr only


@dataclass
class Result:
    variant: Variant
    name: str = ""
    ok: bool = False
    error: str = ""
    shared: int = 0
    estimate: int = 0
    limit: int = 0
    kept: bool = False
    mma: str = ""
    regs: int = 0
    spills: int = 0
    seconds: float = 0.0
    extra: dict = field(default_factory=dict)


def _module(kernel: str):
    import importlib

    return importlib.import_module(f"sparse_prune.kernels.triton_{kernel}")


def all_configs(kernel: str) -> list:
    """Every config the autotuner can try: the full list, then the untuned one
    (``SPARSE_PRUNE_TUNE=0`` and the interpreter)."""
    mod = _module(kernel)
    return [*mod.FULL_CONFIGS, *mod.UNTUNED_CONFIGS]


def _constexprs(kernel: str, dtype: str, gelu: bool, block) -> dict:
    consts = {"HAS_BIAS": True, "GELU": gelu}
    if kernel != "csr":
        consts["PRECISION"] = "ieee" if dtype == "float32" else "tf32"
    if kernel == "bsr":
        consts["BM"], consts["BK"] = block
    return consts


def _signature(kernel: str, dtype: str) -> dict:
    t = "*" + _TRITON_TY[dtype]
    return {
        "semi24": {"x_ptr": t, "val_ptr": t, "meta_ptr": "*i16", "bias_ptr": t, "y_ptr": t,
                   "M": "i32", "N": "i32", "K": "i32", "META_W": "i32"},
        "shrunk": {"x_ptr": t, "val_ptr": t, "out_idx_ptr": "*i64", "in_idx_ptr": "*i64", "bias_ptr": t,
                   "y_ptr": t, "M": "i32", "N": "i32", "K": "i32", "NK": "i32", "KK": "i32"},
        "csr": {"xt_ptr": t, "val_ptr": t, "crow_ptr": "*i32", "col_ptr": "*i32", "order_ptr": "*i32",
                "bias_ptr": t, "yt_ptr": t, "M": "i32", "N": "i32"},
        "bsr": {"x_ptr": t, "val_ptr": t, "crow_ptr": "*i32", "col_ptr": "*i32", "bias_ptr": t, "y_ptr": t,
                "M": "i32", "N": "i32", "K": "i32"},
    }[kernel]


def estimate(v: Variant) -> int:
    """The kernel's own shared-memory estimate for ``v`` (what its autotune pruner uses)."""
    import torch

    cfg = all_configs(v.kernel)[v.config]
    consts = _constexprs(v.kernel, v.dtype, v.gelu, v.block)
    return _module(v.kernel).smem_estimate(cfg.kwargs, cfg.num_stages, getattr(torch, v.dtype), **consts)


def variants(fast: bool = False) -> list[Variant]:
    """Every variant (``fast``: the representative subset described in the module docstring)."""
    from sparse_prune.kernels.triton_smem import AOT_ARCHS, SMEM_LIMITS

    out = []
    for kernel in KERNELS:
        for arch in AOT_ARCHS:
            for dtype in DTYPES:
                blocks = BSR_BLOCKS if kernel == "bsr" else (None,)
                if fast:
                    blocks = blocks[-1:]
                group = [Variant(kernel, i, dtype, arch, gelu, block)
                         for block in blocks for i in range(len(all_configs(kernel))) for gelu in (False, True)]
                if fast:  # the largest estimate the pruner keeps, GELU on: the tightest fit
                    kept = [v for v in group if v.gelu and estimate(v) <= SMEM_LIMITS[arch]]
                    group = [max(kept, key=estimate)]
                out += group
    return out


def _mma(ptx: str) -> str:
    if "wgmma.mma_async" in ptx:
        return "wgmma"
    return "mma" if "mma.sync" in ptx else ""


def compile_variant(v: Variant) -> Result:
    """Compile ``v`` with Triton for ``sm_<arch>`` (CPU only, no driver needed)."""
    import torch
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from sparse_prune.kernels.triton_smem import SMEM_LIMITS

    cfg = all_configs(v.kernel)[v.config]
    mod = _module(v.kernel)
    fn = getattr(mod, f"_{v.kernel}_kernel")
    while not isinstance(fn, triton.runtime.jit.JITFunction):
        fn = fn.fn
    consts = _constexprs(v.kernel, v.dtype, v.gelu, v.block)
    all_consts = {**consts, **cfg.kwargs}
    sig = _signature(v.kernel, v.dtype)
    sig.update({k: "constexpr" for k in all_consts})
    # pointers 16-byte aligned, as torch's allocator gives them (Triton specializes on it at launch)
    attrs = {(fn.arg_names.index(k),): [["tt.divisibility", 16]] for k, ty in sig.items() if ty.startswith("*")}
    res = Result(v, name=f"{v.kernel}{'' if v.block is None else f' {v.block[0]}x{v.block[1]}'} "
                         f"{cfg.kwargs} w{cfg.num_warps} s{cfg.num_stages} {v.dtype} gelu={int(v.gelu)} sm_{v.arch}")
    res.limit = SMEM_LIMITS[v.arch]
    res.estimate = mod.smem_estimate(cfg.kwargs, cfg.num_stages, getattr(torch, v.dtype), **consts)
    res.kept = res.estimate <= res.limit
    start = time.perf_counter()
    try:
        k = triton.compile(ASTSource(fn, sig, all_consts, attrs), target=GPUTarget("cuda", v.arch, 32),
                           options={"num_warps": cfg.num_warps, "num_stages": cfg.num_stages})
        res.shared = int(k.metadata.shared)
        res.mma = _mma(k.asm["ptx"])
        res.regs, res.spills = _regs_spills(k)
        res.ok = True
    except Exception as exc:  # noqa: BLE001 (reported per variant)
        res.error = f"{type(exc).__name__}: {str(exc)[:300]}"
    res.seconds = time.perf_counter() - start
    return res


def _regs_spills(k) -> tuple[int, int]:
    """(registers per thread, bytes of local memory) of the cubin, read with the cuobjdump of
    Triton's wheel (Triton itself fills ``n_regs`` only when a driver loads the binary)."""
    import re
    import subprocess
    import tempfile
    from pathlib import Path

    import triton

    tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    if not tool.exists():
        return -1, -1
    with tempfile.NamedTemporaryFile(suffix=".cubin") as fh:
        fh.write(k.asm["cubin"])
        fh.flush()
        out = subprocess.run([str(tool), "-res-usage", fh.name], capture_output=True, text=True).stdout
    regs, local = re.search(r"REG:(\d+)", out), re.search(r"LOCAL:(\d+)", out)
    return (int(regs.group(1)) if regs else -1), (int(local.group(1)) if local else -1)


def problems(r: Result) -> list[str]:
    """What is wrong with a compiled variant (empty: nothing)."""
    v = r.variant
    if not r.ok:
        return [f"does not compile: {r.error}"]
    out = []
    if r.shared > r.estimate:
        out.append(f"Triton allocates {r.shared} B of shared memory, more than the estimate {r.estimate} B "
                   "the autotune pruner uses")
    if r.kept and r.shared > r.limit:
        out.append(f"kept by the pruner but needs {r.shared} B > {r.limit} B on sm_{v.arch}")
    if v.kernel in DOT_KERNELS and v.dtype != "float32" and not r.mma:
        out.append("no tensor-core MMA (mma.sync/wgmma) in the PTX")
    if v.kernel in DOT_KERNELS and v.dtype == "float32" and r.mma:
        out.append("float32 should multiply in full precision (ieee), but the PTX holds an MMA")
    return out


def coverage_problems(results: list[Result]) -> list[str]:
    """Every (kernel, dtype, arch, block) keeps at least one config, or the autotuner has nothing."""
    groups: dict = {}
    for r in results:
        v = r.variant
        groups.setdefault((v.kernel, v.dtype, v.arch, v.block), []).append(r.kept)
    return [f"{k}: the pruner keeps no config" for k, kept in groups.items() if not any(kept)]


def run(vs: list[Variant], jobs: int) -> list[Result]:
    if jobs <= 1:
        return [compile_variant(v) for v in vs]
    with ProcessPoolExecutor(max_workers=jobs) as pool:
        return list(pool.map(compile_variant, vs, chunksize=1))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--fast", action="store_true", help="the representative subset only")
    p.add_argument("--jobs", type=int, default=min(4, os.cpu_count() or 1), help="compile processes")
    p.add_argument("--json", help="write every result here")
    args = p.parse_args(argv)
    start = time.perf_counter()
    vs = variants(fast=args.fast)
    results = run(vs, args.jobs)
    bad = 0
    for r in results:
        issues = problems(r)
        bad += bool(issues)
        print(f"{'FAIL' if issues else 'ok  '} {r.name}: shared {r.shared} B (estimate {r.estimate}, limit "
              f"{r.limit}, {'kept' if r.kept else 'pruned'}) mma={r.mma or '-'} regs={r.regs} "
              f"spills={r.spills} {r.seconds:.1f}s" + "".join(f"\n     {i}" for i in issues))
    cover = coverage_problems(results)
    for c in cover:
        print("FAIL", c)
    pruned = sum(not r.kept for r in results)
    print(f"{len(results)} variants, {sum(r.ok for r in results)} compiled, {pruned} pruned (do not fit), "
          f"{bad + len(cover)} problems, {time.perf_counter() - start:.0f} s with {args.jobs} processes")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump([{**asdict(r), "variant": asdict(r.variant)} for r in results], fh, indent=1)
    return 1 if bad or cover else 0


if __name__ == "__main__":
    os.environ.pop("TRITON_INTERPRET", None)
    sys.exit(main())
