"""Our Triton kernels compiled ahead of time for sm_80 and sm_90 on this CPU machine.

The sweep (:mod:`sparse_prune.kernels.triton_aot`) runs in a subprocess without
``TRITON_INTERPRET`` (the interpreter replaces ``@triton.jit`` and cannot compile). By default
it compiles the representative subset (one variant per kernel x dtype x arch: the config with
the largest shared-memory estimate the autotune pruner keeps, GELU on); ``make gpu-compile``
(``.ci/run`` calls it) compiles every kernel x config x dtype x GELU x BSR block x arch, and so
does this module with ``SPARSE_PRUNE_AOT=full`` (``=skip``: not at all, as on the GPU machine). Checked per variant: it compiles, Triton's
shared memory is at most the kernel's estimate (what the pruner uses), a config the pruner
keeps fits the SM, and the PTX holds a tensor-core MMA where the dtype should use one.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
import triton

from sparse_prune.kernels import triton_bsr, triton_csr, triton_semi24, triton_shrunk, triton_smem

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODULES = {"semi24": triton_semi24, "shrunk": triton_shrunk, "csr": triton_csr, "bsr": triton_bsr}


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    mode = os.environ.get("SPARSE_PRUNE_AOT", "fast")
    if mode == "skip":
        pytest.skip("SPARSE_PRUNE_AOT=skip (the GPU run: CI compiles the sweep)")
    full = mode == "full"
    out = tmp_path_factory.mktemp("aot") / "results.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    cmd = [sys.executable, "-m", "sparse_prune.kernels.triton_aot", "--jobs", "2", "--json", str(out)]
    proc = subprocess.run(cmd + ([] if full else ["--fast"]), cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=3600)
    if not out.exists():
        pytest.fail(f"the AOT sweep did not run:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return json.loads(out.read_text()), proc


def _failures(results, check):
    return [f"{r['name']}: {msg}" for r in results for msg in check(r)]


def test_every_variant_compiles(sweep):
    results, _ = sweep
    assert results
    assert not _failures(results, lambda r: [] if r["ok"] else [r["error"]])


def test_estimate_bounds_what_triton_allocates(sweep):
    results, _ = sweep
    assert not _failures(results, lambda r: [f"shared {r['shared']} B > estimate {r['estimate']} B"]
                         if r["ok"] and r["shared"] > r["estimate"] else [])


def test_kept_configs_fit_the_sm(sweep):
    results, _ = sweep
    assert not _failures(results, lambda r: [f"kept but needs {r['shared']} B > {r['limit']} B"]
                         if r["kept"] and r["shared"] > r["limit"] else [])


def test_tensor_cores_where_the_dtype_uses_them(sweep):
    """fp16/bf16 ``tl.dot`` kernels hold mma.sync (sm_80) or wgmma/mma.sync (sm_90); fp32 runs
    input_precision="ieee" (no TF32, as F.linear by default): no MMA. CSR has no tl.dot."""
    results, _ = sweep

    def check(r):
        v = r["variant"]
        if v["kernel"] == "csr" or not r["ok"]:
            return []
        if v["dtype"] == "float32":
            return [f"fp32 (ieee) holds {r['mma']}"] if r["mma"] else []
        return [] if r["mma"] else ["no tensor-core MMA in the PTX"]
    assert not _failures(results, check)


def test_cli_agrees_and_every_group_keeps_a_config(sweep):
    results, proc = sweep
    assert proc.returncode == 0, proc.stdout[-4000:]
    assert f"{len(results)} variants, {len(results)} compiled" in proc.stdout


def test_fast_subset_covers_every_kernel_dtype_and_arch(sweep):
    results, _ = sweep
    seen = {(r["variant"]["kernel"], r["variant"]["dtype"], r["variant"]["arch"]) for r in results}
    assert seen == {(k, d, a) for k in MODULES for d in ("float16", "bfloat16", "float32") for a in (80, 90)}


# --- the pruner (no compiling) ---------------------------------------------------------


def test_smem_limits_are_the_programming_guide_figures():
    assert triton_smem.SMEM_LIMITS[80] == 163 * 1024 == 166_912
    assert triton_smem.SMEM_LIMITS[90] == 227 * 1024 == 232_448


@pytest.mark.parametrize("kernel", list(MODULES))
def test_every_kernel_prunes_by_its_estimate(kernel):
    tuner = getattr(MODULES[kernel], f"_{kernel}_kernel")
    assert isinstance(tuner, triton.runtime.Autotuner)
    assert tuner.early_config_prune is not None


def test_select_keeps_what_fits_and_never_nothing():
    assert triton_smem.select(["a", "b", "c"], [10, 30, 20], 20) == ["a", "c"]
    assert triton_smem.select(["a", "b"], [50, 40], 20) == ["b"]  # none fits: the smallest


def test_large_fp32_semi24_configs_are_pruned_on_sm80():
    """What the first sweep found: (128, 128, 64) w8 s3 and (64, 128, 64) w4 s3 in fp32 need
    more than sm_80's 166,912 B, so the pruner must drop them there (and keep them in fp16)."""
    est = triton_semi24.smem_estimate
    for cfg in triton_semi24.FULL_CONFIGS:
        big = cfg.kwargs["BLOCK_N"] == 128 and cfg.kwargs["BLOCK_K"] == 64
        if big:
            assert est(cfg.kwargs, cfg.num_stages, torch.float32) > triton_smem.SMEM_LIMITS[80]
            assert est(cfg.kwargs, cfg.num_stages, torch.float16) <= triton_smem.SMEM_LIMITS[80]


def test_pruner_leaves_cpu_tensors_alone():
    prune = triton_smem.pruner(triton_semi24.smem_estimate)
    configs = triton_semi24.FULL_CONFIGS
    assert prune(configs, {"x_ptr": torch.empty(1)}) == configs


@pytest.mark.gpu
def test_smem_limit_table_matches_this_gpu():
    major, minor = torch.cuda.get_device_capability()
    if 10 * major + minor in triton_smem.SMEM_LIMITS:
        assert triton_smem.device_smem_limit() == triton_smem.SMEM_LIMITS[10 * major + minor]
