"""What a GPU would check first in our built CUDA kernels, read from the cubins on the CPU.

``cuobjdump`` (the CUDA toolkit's, or the copy in Triton's wheel) lists the cubins of
``sparse_prune._C`` / ``_C_sm90``, their resource usage (``-res-usage``), launch bounds
(``-elf``: ``EIATTR_MAX_THREADS``) and SASS. Checked here: the archs we ship, no local memory
(spills) in any kernel, registers within what one block of the size we launch can have, and
the sparse tensor-core instructions really in the binaries. Skips with the reason when no
cuobjdump exists or an extension is not built.
"""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import subprocess
from functools import cache
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
REGISTERS_PER_SM = 65536  # sm_80 and sm_90
MAX_REGISTERS_PER_THREAD = 255
REGISTER_GRANULE = 8  # per thread (256 per warp)


@cache
def _cuobjdump() -> str | None:
    cands = [os.path.join(os.environ.get("CUDA_HOME", "/usr/local/cuda"), "bin", "cuobjdump"),
             shutil.which("cuobjdump")]
    spec = importlib.util.find_spec("triton")
    if spec is not None and spec.origin:
        cands.append(str(Path(spec.origin).parent / "backends" / "nvidia" / "bin" / "cuobjdump"))
    return next((c for c in cands if c and os.access(c, os.X_OK)), None)


def _library(name: str) -> Path:
    tool = _cuobjdump()
    if tool is None:
        pytest.skip("no cuobjdump: neither $CUDA_HOME/bin, PATH nor Triton's wheel has one")
    found = sorted((ROOT / "sparse_prune").glob(f"{name}.*.so"))
    if not found:
        pytest.skip(f"sparse_prune.{name} is not built here (no CUDA toolkit, or SPARSE_PRUNE_CUDA/SM90=0)")
    return found[0]


@cache
def _dump(lib: Path, flag: str) -> str:
    out = subprocess.run([_cuobjdump(), flag, str(lib)], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    return out.stdout


def _resources(lib: Path) -> list[tuple[str, str, dict]]:
    """(arch, kernel, {REG, STACK, SHARED, LOCAL, ...}) of every kernel of every cubin."""
    rows, arch = [], None
    lines = _dump(lib, "-res-usage").splitlines()
    for i, line in enumerate(lines):
        if line.startswith("arch = "):
            arch = line.split("=")[1].strip()
        m = re.match(r"\s*Function (\S+):$", line)
        if m:
            rows.append((arch, m.group(1), {k: int(v) for k, v in re.findall(r"(\w+):(\d+)", lines[i + 1])}))
    return rows


def _launch_bounds(lib: Path) -> dict[str, int]:
    """kernel -> EIATTR_MAX_THREADS (its ``__launch_bounds__``), for the kernels that have one."""
    bounds, kernel = {}, None
    lines = _dump(lib, "-elf").splitlines()
    for i, line in enumerate(lines):
        if line.startswith(".nv.info."):
            kernel = line[len(".nv.info."):].strip()
        elif "EIATTR_MAX_THREADS" in line and kernel:
            value = next(v for v in lines[i + 1:i + 4] if "Value:" in v)
            x, y, z = (int(t, 16) for t in value.split()[1:4])
            bounds[kernel] = x * y * z
    return bounds


def _source_int(path: str, pattern: str) -> int:
    m = re.search(pattern, (ROOT / path).read_text())
    assert m, f"{pattern!r} not found in {path}: update this test with the launch code"
    return int(m.group(1))


def _launched_threads() -> dict[str, int]:
    """Block sizes our launchers use (read from the sources) for kernels without launch bounds."""
    return {
        "compress_2to4_kernel": _source_int("csrc/compress_2to4.cu", r"const int threads = (\d+);"),
        "csr_spmm_kernel": 32 * _source_int("csrc/csr_spmm.cu", r"kWarpsPerBlock = (\d+);"),
        "semi24_gemm_kernel": 32 * _source_int("csrc/semi24_gemm.cu", r"kWarps = (\d+);"),
    }


def register_limit(threads: int) -> int:
    """Registers per thread that still let one block of ``threads`` fit on an SM."""
    warps = -(-threads // 32)
    per_thread = REGISTERS_PER_SM // (warps * 32) // REGISTER_GRANULE * REGISTER_GRANULE
    return min(MAX_REGISTERS_PER_THREAD, per_thread)


def test_register_limit_rule():
    assert register_limit(128) == 255 and register_limit(256) == 255
    assert register_limit(384) == 168  # CUTLASS's warp-specialized cooperative kernel (3 warpgroups)
    assert register_limit(1024) == 64


@pytest.mark.parametrize("name, archs", [("_C", {"sm_80", "sm_90"}), ("_C_sm90", {"sm_90a"})])
def test_archs_shipped(name, archs):
    lib = _library(name)
    listed = set(re.findall(r"\.(sm_\d+a?)\.cubin", _dump(lib, "--list-elf")))
    assert listed == archs, f"{lib.name}: cubins for {sorted(listed)}, expected {sorted(archs)}"


@pytest.mark.parametrize("name", ["_C", "_C_sm90"])
def test_no_spills_and_registers_fit_the_block(name):
    lib = _library(name)
    rows = _resources(lib)
    assert rows, f"no kernels found in {lib.name}"
    bounds, launched = _launch_bounds(lib), _launched_threads()
    for arch, kernel, res in rows:
        assert res.get("LOCAL", 0) == 0, f"{arch} {kernel}: {res['LOCAL']} B of local memory (spills)"
        threads = bounds.get(kernel) or next((t for key, t in launched.items() if key in kernel), None)
        assert threads, f"{arch} {kernel}: no launch bounds and no known block size: add it to _launched_threads"
        assert res["REG"] <= register_limit(threads), (
            f"{arch} {kernel}: {res['REG']} registers > {register_limit(threads)} for {threads}-thread blocks")


def test_gemm_kernels_keep_no_stack():
    """The GEMM kernels keep everything in registers (compress_2to4 has a small stack frame)."""
    for name in ("_C", "_C_sm90"):
        lib = _library(name)
        for arch, kernel, res in _resources(lib):
            if "compress_2to4_kernel" not in kernel and "Compressor" not in kernel:
                assert res.get("STACK", 0) == 0, f"{arch} {kernel}: stack frame of {res['STACK']} B"


@pytest.mark.parametrize("name, instruction, arch", [("_C", "HMMA.SP", "sm_80"), ("_C", "HMMA.SP", "sm_90"),
                                                     ("_C_sm90", "HGMMA.SP", "sm_90a")])
def test_sparse_tensor_core_instructions_present(name, instruction, arch):
    lib = _library(name)
    sass = _dump(lib, "-sass")
    per_arch = re.split(r"\n(?=\s*Fatbin elf code)", sass)
    found = [block for block in per_arch if f"arch = {arch}\n" in block and instruction in block]
    assert found, f"{lib.name}: no {instruction} in the {arch} SASS"
