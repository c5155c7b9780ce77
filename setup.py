"""Build script: compiles csrc/cpu/ into ``sparse_prune._C_cpu`` on every machine, and csrc/
into ``sparse_prune._C`` where a CUDA toolkit exists.

``sparse_prune._C_cpu`` (csrc/cpu/) holds the CPU kernels of the csr/bsr/2:4 linear ops. It
needs only a C++ compiler and torch (CPU-only or CUDA builds alike). Its AVX2+FMA unit is
compiled for those instructions alone (a ``#pragma GCC target`` in the file) and called only
after a runtime CPU check; the portable unit covers every other CPU.

The extension is built whenever the installed torch is a CUDA build and a CUDA toolkit is
found, with or without a GPU on the machine (compiling needs nvcc, not a device).

A second extension, ``sparse_prune._C_sm90`` (csrc/sm90/), holds the Hopper 2:4 GEMM built
on CUTLASS 3.x/4.x headers, compiled for sm_90a only. It is built when it can be used or when
asked: an sm_90 GPU on this machine, ``9.0a`` in ``TORCH_CUDA_ARCH_LIST``, or
``SPARSE_PRUNE_SM90=1`` (``make`` sets it, so CI keeps compiling it). Its headers come from
``CUTLASS_PATH`` or from the installed ``nvidia-cutlass`` package (``cutlass_library/source``;
the build backend in build_tools/ adds it to an isolated build environment only then).

The decisions live in build_tools/sparse_prune_build.py, shared with the PEP 517 backend.

Environment:
  SPARSE_PRUNE_CPU=0     skip sparse_prune._C_cpu (with SPARSE_PRUNE_CUDA=0: a pure-Python wheel)
  SPARSE_PRUNE_CUDA=0    never build the CUDA extensions
  SPARSE_PRUNE_CUDA=1    a missing toolkit or a CPU-only torch is an error
  SPARSE_PRUNE_SM90=0    never build sparse_prune._C_sm90
  SPARSE_PRUNE_SM90=1    build it (missing CUTLASS headers are an error)
  CUTLASS_PATH           CUTLASS checkout (include/ and tools/util/include/ below it)
  CUDA_HOME              toolkit root (default: /usr/local/cuda when it holds bin/nvcc)
  TORCH_CUDA_ARCH_LIST   target archs (default "8.0;9.0")
  MAX_JOBS               parallel compile jobs (default: usable cores, capped by available
                         memory per job: ~6 GB for a CUTLASS sm90 unit, ~2 GB otherwise)
"""

import importlib.util
import os
import sys
from pathlib import Path

from setuptools import setup

ROOT = Path(__file__).parent
sys.path.insert(0, str(ROOT / "build_tools"))
import sparse_prune_build as spb  # noqa: E402


def _say(msg: str) -> None:
    print(f"[sparse_prune setup] {msg}", file=sys.stderr)


_CUTLASS_PROBE = spb.CUTLASS_PROBE


def _cutlass_root() -> tuple[Path | None, str]:
    """(folder holding include/ and tools/util/include/, where it came from) or (None, why)."""
    env = os.environ.get("CUTLASS_PATH", "").strip()
    if env:
        root = Path(env)
        if (root / "include" / _CUTLASS_PROBE).exists():
            return root, f"CUTLASS_PATH={env}"
        return None, f"CUTLASS_PATH={env} has no include/{_CUTLASS_PROBE}"
    try:
        spec = importlib.util.find_spec("cutlass_library")
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        return None, ("no CUTLASS headers: set CUTLASS_PATH or `pip install nvidia-cutlass` "
                      "(its cutlass_library/source holds them)")
    root = Path(list(spec.submodule_search_locations)[0]) / "source"
    if (root / "include" / _CUTLASS_PROBE).exists():
        return root, f"nvidia-cutlass package ({root})"
    return None, f"the installed cutlass_library has no source/include/{_CUTLASS_PROBE} (too old?)"


def _gpu_capabilities() -> list[tuple[int, int]]:
    """This machine's GPUs: nvidia-smi, else torch (which may be a CPU build or see none)."""
    caps = spb.detect_gpu_capabilities()
    if caps:
        return caps
    try:
        import torch

        if torch.cuda.is_available():
            return [tuple(torch.cuda.get_device_capability(i)) for i in range(torch.cuda.device_count())]
    except Exception as exc:  # noqa: BLE001 - a broken driver must not break the build
        _say(f"could not query GPUs through torch ({type(exc).__name__}: {exc})")
    return []


def _sm90_extension(CUDAExtension):
    """sparse_prune._C_sm90 (csrc/sm90/, sm_90a only), or None with the reason printed."""
    need_caps = spb.env_flag(os.environ, "SPARSE_PRUNE_SM90") == ""
    decision = spb.sm90_decision(os.environ, _gpu_capabilities() if need_caps else [])
    if not decision.build:
        _say(f"skipping sparse_prune._C_sm90 (Hopper CUTLASS 2:4 GEMM): {decision.reason}")
        return None
    root, where = _cutlass_root()
    if root is None:
        if decision.strict:
            raise SystemExit(f"SPARSE_PRUNE_SM90=1 but {where}")
        _say(f"skipping sparse_prune._C_sm90 (Hopper CUTLASS 2:4 GEMM; wanted: {decision.reason}): {where}")
        return None
    _say(f"sparse_prune._C_sm90 wanted: {decision.reason}")
    sources = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "csrc" / "sm90").iterdir()
                     if p.suffix in (".cu", ".cpp"))
    _say(f"building sparse_prune._C_sm90 for sm_90a with CUTLASS headers from {where}: "
         f"{', '.join(sources)}")
    nvcc = [
        "-O3", "-DNDEBUG",
        # Only sm_90a: wgmma.sp and setmaxnreg exist there alone. Naming an arch here also
        # keeps torch from adding TORCH_CUDA_ARCH_LIST's targets to this extension.
        "-gencode=arch=compute_90a,code=sm_90a",
        "--expt-relaxed-constexpr", "--expt-extended-lambda",
        # CUTLASS's sm100 headers (included by its umbrella headers) capture `this` implicitly,
        # deprecated in C++20: 6 warnings per unit, none about our code.
        "--diag-suppress=2908",
        # torch defines these to hide the half operators; CUTLASS needs them.
        "-U__CUDA_NO_HALF_OPERATORS__", "-U__CUDA_NO_HALF_CONVERSIONS__",
        "-U__CUDA_NO_HALF2_OPERATORS__", "-U__CUDA_NO_BFLOAT16_CONVERSIONS__",
    ]
    return CUDAExtension(
        name="sparse_prune._C_sm90",
        sources=sources,
        include_dirs=[str(root / "include"), str(root / "tools" / "util" / "include"),
                      str(ROOT / "csrc" / "sm90")],
        extra_compile_args={"cxx": ["-O3"], "nvcc": nvcc},
        py_limited_api=False,
    )


def _cpu_extension():
    """sparse_prune._C_cpu (csrc/cpu/), or None (SPARSE_PRUNE_CPU=0, or no torch at build time)."""
    if spb.env_flag(os.environ, "SPARSE_PRUNE_CPU") == "0":
        _say("SPARSE_PRUNE_CPU=0: skipping the CPU kernels (sparse_prune._C_cpu)")
        return None
    try:
        from torch.utils.cpp_extension import CppExtension
    except ImportError:
        _say("torch not importable at build time: skipping the CPU kernels (sparse_prune._C_cpu)")
        return None
    sources = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "csrc" / "cpu").glob("*.cpp"))
    _say(f"building sparse_prune._C_cpu (CPU kernels, AVX2+FMA and portable): {', '.join(sources)}")
    return CppExtension(
        name="sparse_prune._C_cpu",
        sources=sources,
        include_dirs=[str(ROOT / "csrc" / "cpu")],
        # -fno-tree-loop-distribute-patterns: gcc otherwise turns accumulator-zeroing loops into
        # memset calls and spills the accumulators (seen in a prototype of these kernels).
        # -fopenmp: at::parallel_for is an inline template over `#pragma omp parallel`; without
        # the flag it silently runs on one thread (torch's own build uses OpenMP the same way).
        extra_compile_args={"cxx": ["-O3", "-fopenmp", "-fno-tree-loop-distribute-patterns"]
                            if sys.platform.startswith("linux") else ["-O3"]},
        extra_link_args=["-fopenmp"] if sys.platform.startswith("linux") else [],
        py_limited_api=False,
    )


def _cuda_extension():
    """Return [ext_modules] (possibly empty) with the reason printed for what is skipped."""
    flag = spb.env_flag(os.environ, "SPARSE_PRUNE_CUDA")
    if flag == "0":
        _say("SPARSE_PRUNE_CUDA=0: skipping the CUDA extension")
        return []
    try:
        import torch
    except ImportError:
        if flag == "1":
            raise SystemExit("SPARSE_PRUNE_CUDA=1 but torch is not importable at build time") from None
        _say("torch not importable at build time: skipping the CUDA extension")
        return []
    cuda_home = spb.find_cuda_home()
    reason = None
    if torch.version.cuda is None:
        reason = f"torch {torch.__version__} is a CPU-only build"
    elif cuda_home is None:
        reason = "no CUDA toolkit found (set CUDA_HOME to a folder holding bin/nvcc)"
    if reason:
        if flag == "1":
            raise SystemExit(f"SPARSE_PRUNE_CUDA=1 but {reason}")
        _say(f"skipping the CUDA extension: {reason}")
        return []

    # torch reads CUDA_HOME when its cpp_extension module is first imported; without it, it
    # guesses /usr/local and fails to link -lcudart (seen on the CI machine).
    os.environ["CUDA_HOME"] = cuda_home
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
    from torch.utils.cpp_extension import CUDAExtension

    # csrc/*.c* only: csrc/sm90/ is the separate sm_90a extension below.
    sources = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "csrc").glob("*.c*"))
    _say(
        f"building sparse_prune._C with CUDA {torch.version.cuda} from {cuda_home} "
        f"for archs {os.environ['TORCH_CUDA_ARCH_LIST']}: {', '.join(sources)}"
    )
    ext = CUDAExtension(
        name="sparse_prune._C",
        sources=sources,
        extra_compile_args={"cxx": ["-O3"], "nvcc": ["-O3", "--use_fast_math", "-lineinfo"]},
        py_limited_api=False,
    )
    exts = [ext]
    sm90 = _sm90_extension(CUDAExtension)
    if sm90 is not None:
        exts.append(sm90)
    return exts


# The environment as the user gave it: MAX_JOBS is set per extension below only when absent here.
_USER_ENV = dict(os.environ)


class _MaxJobs:
    """Mixin for torch's BuildExtension: MAX_JOBS per extension when the user set none."""

    def build_extension(self, ext):
        if "MAX_JOBS" not in _USER_ENV:
            jobs = spb.default_max_jobs(
                spb.machine_cpus(), spb.machine_available_memory(),
                spb.JOB_MEMORY_BYTES.get(ext.name, spb.DEFAULT_JOB_MEMORY_BYTES))
            os.environ["MAX_JOBS"] = str(jobs)
            _say(f"{ext.name}: MAX_JOBS={jobs} (from {spb.machine_cpus()} usable cores and "
                 f"available memory; set MAX_JOBS to override)")
        super().build_extension(ext)


def _extensions():
    """([ext_modules], {cmdclass}): the CPU kernels and the CUDA extensions, each where it can."""
    cpu = _cpu_extension()
    cuda_flag = spb.env_flag(os.environ, "SPARSE_PRUNE_CUDA")
    if cpu is None and cuda_flag == "0":
        return [], {}  # nothing to compile: a pure-Python wheel, torch not even imported
    try:
        from torch.utils.cpp_extension import BuildExtension
    except ImportError:
        if cuda_flag == "1":
            raise SystemExit("SPARSE_PRUNE_CUDA=1 but torch is not importable at build time") from None
        if cuda_flag != "0":
            _say("torch not importable at build time: skipping the CUDA extension")
        return [], {}
    exts = ([cpu] if cpu is not None else []) + _cuda_extension()
    if not exts:
        return [], {}
    build = type("build_ext", (_MaxJobs, BuildExtension.with_options(no_python_abi_suffix=False)), {})
    return exts, {"build_ext": build}


ext_modules, cmdclass = _extensions()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
