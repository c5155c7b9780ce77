"""Build script: compiles csrc/ into ``sparse_prune._C`` where a CUDA toolkit exists.

The extension is built whenever the installed torch is a CUDA build and a CUDA toolkit is
found, with or without a GPU on the machine (compiling needs nvcc, not a device).

Environment:
  SPARSE_PRUNE_CUDA=0    never build the extension
  SPARSE_PRUNE_CUDA=1    a missing toolkit or a CPU-only torch is an error
  CUDA_HOME              toolkit root (default: /usr/local/cuda when it holds bin/nvcc)
  TORCH_CUDA_ARCH_LIST   target archs (default "8.0;9.0")
  MAX_JOBS               parallel compile jobs (honoured by torch's ninja build)
"""

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


def _cuda_extension():
    """Return ([ext_modules], {cmdclass}) or ([], {}) with the reason printed."""
    flag = os.environ.get("SPARSE_PRUNE_CUDA", "").strip()
    if flag not in ("", "0", "1"):
        raise SystemExit(f"SPARSE_PRUNE_CUDA must be 0 or 1, got {flag!r}")
    if flag == "0":
        _say("SPARSE_PRUNE_CUDA=0: skipping the CUDA extension")
        return [], {}
    try:
        import torch
    except ImportError:
        if flag == "1":
            raise SystemExit("SPARSE_PRUNE_CUDA=1 but torch is not importable at build time") from None
        _say("torch not importable at build time: skipping the CUDA extension")
        return [], {}
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
        return [], {}

    # torch reads CUDA_HOME when its cpp_extension module is first imported; without it, it
    # guesses /usr/local and fails to link -lcudart (seen on the CI machine).
    os.environ["CUDA_HOME"] = cuda_home
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
    from torch.utils.cpp_extension import BuildExtension, CUDAExtension

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
    return [ext], {"build_ext": BuildExtension.with_options(no_python_abi_suffix=False)}


ext_modules, cmdclass = _cuda_extension()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
