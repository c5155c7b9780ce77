"""Build script: compiles csrc/cpu/ into ``sparse_prune._C_cpu`` on every machine, and csrc/
into ``sparse_prune._C`` where a CUDA toolkit exists.

``sparse_prune._C_cpu`` (csrc/cpu/) holds the CPU kernels of the csr/bsr/2:4 linear ops. It
needs only a C++ compiler and torch (CPU-only or CUDA builds alike). Its AVX2+FMA unit is
compiled for those instructions alone (a ``#pragma GCC target`` in the file) and called only
after a runtime CPU check; the portable unit covers every other CPU.

The extension is built whenever the installed torch is a CUDA build and a CUDA toolkit is
found, with or without a GPU on the machine (compiling needs nvcc, not a device).

A second extension, ``sparse_prune._C_sm90`` (csrc/sm90/), holds the Hopper 2:4 GEMM built
on CUTLASS 3.x/4.x headers, compiled for sm_90a only. Its headers come from ``CUTLASS_PATH``
or from the installed ``nvidia-cutlass`` package (``cutlass_library/source``); without them it
is skipped with a printed reason.

Environment:
  SPARSE_PRUNE_CUDA=0    never build the extensions
  SPARSE_PRUNE_CUDA=1    a missing toolkit or a CPU-only torch is an error
  SPARSE_PRUNE_SM90=0    skip sparse_prune._C_sm90 (saves its ~2-5 min of compiling)
  SPARSE_PRUNE_SM90=1    missing CUTLASS headers are an error
  CUTLASS_PATH           CUTLASS checkout (include/ and tools/util/include/ below it)
  CUDA_HOME              toolkit root (default: /usr/local/cuda when it holds bin/nvcc)
  TORCH_CUDA_ARCH_LIST   target archs (default "8.0;9.0")
  MAX_JOBS               parallel compile jobs (honoured by torch's ninja build)
"""

import importlib.util
import os
import shutil
import sys
from pathlib import Path

from setuptools import setup

ROOT = Path(__file__).parent


def _say(msg: str) -> None:
    print(f"[sparse_prune setup] {msg}", file=sys.stderr)


def _find_cuda_home() -> str | None:
    for cand in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if cand and (Path(cand) / "bin" / "nvcc").exists():
            return cand
    nvcc = shutil.which("nvcc")
    return str(Path(nvcc).resolve().parent.parent) if nvcc else None


# A header only the CUTLASS versions with the sm90 sparse GEMM builder have.
_CUTLASS_PROBE = "cutlass/gemm/collective/builders/sm90_sparse_gmma_builder.inl"


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


def _sm90_extension(CUDAExtension):
    """sparse_prune._C_sm90 (csrc/sm90/, sm_90a only), or None with the reason printed."""
    flag = os.environ.get("SPARSE_PRUNE_SM90", "").strip()
    if flag not in ("", "0", "1"):
        raise SystemExit(f"SPARSE_PRUNE_SM90 must be 0 or 1, got {flag!r}")
    if flag == "0":
        _say("SPARSE_PRUNE_SM90=0: skipping sparse_prune._C_sm90 (Hopper CUTLASS 2:4 GEMM)")
        return None
    root, where = _cutlass_root()
    if root is None:
        if flag == "1":
            raise SystemExit(f"SPARSE_PRUNE_SM90=1 but {where}")
        _say(f"skipping sparse_prune._C_sm90 (Hopper CUTLASS 2:4 GEMM): {where}")
        return None
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
    """sparse_prune._C_cpu (csrc/cpu/), or None when torch is not importable at build time."""
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
    flag = os.environ.get("SPARSE_PRUNE_CUDA", "").strip()
    if flag not in ("", "0", "1"):
        raise SystemExit(f"SPARSE_PRUNE_CUDA must be 0 or 1, got {flag!r}")
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
    cuda_home = _find_cuda_home()
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


def _extensions():
    """([ext_modules], {cmdclass}): the CPU kernels wherever torch imports, plus CUDA's."""
    cpu = _cpu_extension()
    if cpu is None:
        if os.environ.get("SPARSE_PRUNE_CUDA", "").strip() == "1":
            raise SystemExit("SPARSE_PRUNE_CUDA=1 but torch is not importable at build time")
        return [], {}
    from torch.utils.cpp_extension import BuildExtension

    return [cpu, *_cuda_extension()], {"build_ext": BuildExtension.with_options(no_python_abi_suffix=False)}


ext_modules, cmdclass = _extensions()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
