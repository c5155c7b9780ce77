"""sparse_prune's build decisions and its PEP 517 build backend (a thin setuptools wrapper).

Two jobs, one module, so that the build front end and ``setup.py`` decide alike:

* **Pure decisions** (tested in ``tests/test_packaging.py``): which extensions to compile
  (:func:`plan_build`, :func:`sm90_decision`), how many parallel compile jobs a machine can
  afford (:func:`default_max_jobs`), what an isolated build environment must hold
  (:func:`build_requires`), and which source files an sdist must carry
  (:func:`missing_from_sdist`).
* **The backend** (``[build-system] build-backend = "sparse_prune_build"``, ``backend-path =
  ["build_tools"]``): setuptools' ``build_meta`` with ``get_requires_for_build_wheel`` /
  ``_editable`` replaced, so the isolated build environment gets torch and ninja only when
  something compiles, and ``nvidia-cutlass`` (which drags in cuda-python, scipy, networkx,
  pydot, treelib) only when ``sparse_prune._C_sm90`` will be built and ``CUTLASS_PATH`` does
  not already name the headers. Everything else is setuptools' own hook.

Nothing here imports torch: ``get_requires_for_build_wheel`` runs before torch is installed.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

from setuptools import build_meta as _st

# ---------------------------------------------------------------------------------------------
# Pure decisions
# ---------------------------------------------------------------------------------------------

TORCH_REQ = "torch>=2.6"
NINJA_REQ = "ninja"
CUTLASS_REQ = "nvidia-cutlass>=4.2"

# A header only the CUTLASS versions with the sm90 sparse GEMM builder have.
CUTLASS_PROBE = "cutlass/gemm/collective/builders/sm90_sparse_gmma_builder.inl"

# Peak resident memory of one compile job, per extension, with some headroom. Seen on the
# 2-core build machine: each CUTLASS sm90 unit 5.2-5.3 GB, the dispatch unit 2 GB; the _C
# units (mma.sp kernels, two archs) and the CPU units stay under 1.5 GB.
JOB_MEMORY_BYTES = {
    "sparse_prune._C_sm90": 6 * 2**30,
    "sparse_prune._C": 2 * 2**30,
    "sparse_prune._C_cpu": 2 * 2**30,
}
DEFAULT_JOB_MEMORY_BYTES = 2 * 2**30


def env_flag(env: Mapping[str, str], name: str) -> str:
    """'' (unset), '0' or '1'; anything else is an error naming the variable."""
    value = env.get(name, "").strip()
    if value not in ("", "0", "1"):
        raise SystemExit(f"{name} must be 0 or 1, got {value!r}")
    return value


def arch_list_has_sm90a(arch_list: str | None) -> bool:
    """True when TORCH_CUDA_ARCH_LIST names 9.0a (``"8.0;9.0a"``, ``"9.0a+PTX"``, ``"9.0a 10.0"``)."""
    if not arch_list:
        return False
    tokens = re.split(r"[;,\s]+", arch_list.strip())
    return any(t.split("+")[0].strip().lower() in ("9.0a", "90a", "sm_90a") for t in tokens if t)


@dataclass(frozen=True)
class Sm90Decision:
    build: bool
    strict: bool  # SPARSE_PRUNE_SM90=1: missing CUTLASS headers are an error, not a skip
    reason: str


def sm90_decision(env: Mapping[str, str], gpu_capabilities: Iterable[tuple[int, int]]) -> Sm90Decision:
    """Whether to compile ``sparse_prune._C_sm90`` (the Hopper CUTLASS 2:4 GEMM).

    Built when it can be used or when asked: ``SPARSE_PRUNE_SM90=1``, an sm_90 GPU on this
    machine, or ``9.0a`` in ``TORCH_CUDA_ARCH_LIST``. ``SPARSE_PRUNE_SM90=0`` always skips it.
    Otherwise it is skipped: its six CUTLASS units cost minutes and ~5 GB of memory per job, and
    the kernels run on sm_90 alone.
    """
    flag = env_flag(env, "SPARSE_PRUNE_SM90")
    if flag == "0":
        return Sm90Decision(False, False, "SPARSE_PRUNE_SM90=0")
    if flag == "1":
        return Sm90Decision(True, True, "SPARSE_PRUNE_SM90=1")
    caps = sorted(set(gpu_capabilities))
    if (9, 0) in caps:
        return Sm90Decision(True, False, "an sm_90 GPU is present")
    if arch_list_has_sm90a(env.get("TORCH_CUDA_ARCH_LIST")):
        return Sm90Decision(True, False, f"TORCH_CUDA_ARCH_LIST={env['TORCH_CUDA_ARCH_LIST']} names 9.0a")
    seen = ", ".join(f"sm_{a}{b}" for a, b in caps) or "no GPU"
    return Sm90Decision(False, False, f"{seen} here and no 9.0a in TORCH_CUDA_ARCH_LIST "
                                      "(set SPARSE_PRUNE_SM90=1 to build it anyway)")


@dataclass(frozen=True)
class BuildPlan:
    cpu: bool  # sparse_prune._C_cpu
    cuda: bool  # sparse_prune._C (still subject to a CUDA torch, checked by setup.py)
    cuda_strict: bool
    sm90: Sm90Decision
    cuda_reason: str

    @property
    def compiles(self) -> bool:
        return self.cpu or self.cuda


def plan_build(env: Mapping[str, str], *, toolkit: bool,
               gpu_capabilities: Iterable[tuple[int, int]] = ()) -> BuildPlan:
    """What the build will try to compile, from the environment and what the machine has.

    ``toolkit``: a CUDA toolkit (nvcc) was found. ``SPARSE_PRUNE_CPU=0`` skips the CPU kernels,
    ``SPARSE_PRUNE_CUDA=0`` the CUDA extensions (``_C`` and ``_C_sm90``); with both the wheel
    is pure Python and nothing but setuptools is needed to build it.
    """
    cpu = env_flag(env, "SPARSE_PRUNE_CPU") != "0"
    cuda_flag = env_flag(env, "SPARSE_PRUNE_CUDA")
    if cuda_flag == "0":
        cuda, reason = False, "SPARSE_PRUNE_CUDA=0"
    elif toolkit:
        cuda, reason = True, "a CUDA toolkit is present"
    elif cuda_flag == "1":
        cuda, reason = True, "SPARSE_PRUNE_CUDA=1 (no toolkit found: setup.py will fail)"
    else:
        cuda, reason = False, "no CUDA toolkit found (set CUDA_HOME to a folder holding bin/nvcc)"
    sm90 = sm90_decision(env, gpu_capabilities) if cuda else Sm90Decision(False, False, reason)
    return BuildPlan(cpu=cpu, cuda=cuda, cuda_strict=cuda_flag == "1", sm90=sm90, cuda_reason=reason)


def cutlass_path_ok(env: Mapping[str, str]) -> bool:
    """``CUTLASS_PATH`` names a checkout with the sm90 sparse GEMM headers."""
    path = env.get("CUTLASS_PATH", "").strip()
    return bool(path) and (Path(path) / "include" / CUTLASS_PROBE).exists()


def build_requires(plan: BuildPlan, *, have_cutlass_path: bool) -> list[str]:
    """The packages an isolated build environment needs beyond setuptools and wheel."""
    if not plan.compiles:
        return []
    reqs = [TORCH_REQ, NINJA_REQ]
    if plan.sm90.build and not have_cutlass_path:
        reqs.append(CUTLASS_REQ)
    return reqs


def default_max_jobs(cpus: int, available_memory: int | None,
                     job_memory: int = DEFAULT_JOB_MEMORY_BYTES) -> int:
    """Parallel compile jobs: one per usable core, but no more than the memory holds.

    torch's own default is ``cpu_count + 2`` (4 nvcc at once on a 2-core machine, each CUTLASS
    sm90 unit ~5 GB). ``available_memory`` None (unknown) leaves only the core count.
    """
    jobs = max(1, int(cpus))
    if available_memory is not None and job_memory > 0:
        jobs = min(jobs, max(1, int(available_memory) // int(job_memory)))
    return jobs


def parse_cgroup_cpu_max(text: str | None) -> int | None:
    """Cores allowed by a cgroup v2 ``cpu.max`` (``"200000 100000"`` -> 2; ``"max ..."`` -> None)."""
    if not text:
        return None
    parts = text.split()
    if len(parts) != 2 or parts[0] == "max":
        return None
    try:
        quota, period = int(parts[0]), int(parts[1])
    except ValueError:
        return None
    return max(1, -(-quota // period)) if period > 0 and quota > 0 else None


def parse_meminfo_available(text: str | None) -> int | None:
    """``MemAvailable`` of /proc/meminfo in bytes (None when absent)."""
    m = re.search(r"^MemAvailable:\s+(\d+)\s*kB", text or "", re.M)
    return int(m.group(1)) * 1024 if m else None


def parse_cgroup_memory(max_text: str | None, current_text: str | None) -> int | None:
    """Bytes a cgroup v2 still allows (``memory.max`` - ``memory.current``; None when unlimited)."""
    if not max_text or max_text.strip() == "max":
        return None
    try:
        limit = int(max_text.strip())
        used = int(current_text.strip()) if current_text and current_text.strip() else 0
    except ValueError:
        return None
    return max(0, limit - used)


def _read(path: str) -> str | None:
    try:
        return Path(path).read_text()
    except OSError:
        return None


def machine_cpus() -> int:
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cpus = os.cpu_count() or 1
    quota = parse_cgroup_cpu_max(_read("/sys/fs/cgroup/cpu.max"))
    return min(cpus, quota) if quota else cpus


def machine_available_memory() -> int | None:
    avail = [v for v in (parse_meminfo_available(_read("/proc/meminfo")),
                         parse_cgroup_memory(_read("/sys/fs/cgroup/memory.max"),
                                             _read("/sys/fs/cgroup/memory.current")))
             if v is not None]
    return min(avail) if avail else None


def find_cuda_home(env: Mapping[str, str] | None = None) -> str | None:
    env = os.environ if env is None else env
    for cand in (env.get("CUDA_HOME"), env.get("CUDA_PATH"), "/usr/local/cuda"):
        if cand and (Path(cand) / "bin" / "nvcc").exists():
            return cand
    nvcc = shutil.which("nvcc")
    return str(Path(nvcc).resolve().parent.parent) if nvcc else None


def parse_compute_caps(text: str) -> list[tuple[int, int]]:
    """``nvidia-smi --query-gpu=compute_cap --format=csv,noheader`` output -> [(9, 0), ...]."""
    caps = []
    for line in text.splitlines():
        m = re.fullmatch(r"\s*(\d+)\.(\d+)\s*", line)
        if m:
            caps.append((int(m.group(1)), int(m.group(2))))
    return caps


def detect_gpu_capabilities() -> list[tuple[int, int]]:
    """Compute capabilities of this machine's GPUs via nvidia-smi (no torch needed); [] if none."""
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return []
    try:
        out = subprocess.run([smi, "--query-gpu=compute_cap", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=30, check=False)
    except (OSError, subprocess.SubprocessError):
        return []
    return parse_compute_caps(out.stdout) if out.returncode == 0 else []


def missing_from_sdist(sdist_names: Iterable[str], required: Iterable[str]) -> list[str]:
    """Required repository paths absent from an sdist's member names (``pkg-1.0/<path>``)."""
    have = set()
    for name in sdist_names:
        parts = name.split("/", 1)
        if len(parts) == 2 and parts[1]:
            have.add(parts[1])
    return sorted(set(required) - have)


# Tracked files an sdist must carry: everything needed to build every extension, run the
# tests, and read the licence. (benchmarks/results/ is measured data, not source.)
SDIST_REQUIRED_PREFIXES = ("csrc/", "sparse_prune/", "tests/", "build_tools/", "docs/", "benchmarks/")
SDIST_REQUIRED_FILES = ("LICENSE", "README.md", "pyproject.toml", "setup.py", "MANIFEST.in",
                        "Makefile", "sparse_prune/py.typed")
SDIST_EXCLUDED_PREFIXES = ("benchmarks/results/",)


def sdist_required(tracked: Iterable[str]) -> list[str]:
    """From ``git ls-files``: the paths an sdist must contain."""
    req = set(SDIST_REQUIRED_FILES)
    for path in tracked:
        if path.startswith(SDIST_REQUIRED_PREFIXES) and not path.startswith(SDIST_EXCLUDED_PREFIXES):
            req.add(path)
    return sorted(req)


# ---------------------------------------------------------------------------------------------
# PEP 517 backend: setuptools.build_meta, with build requirements that follow the plan
# ---------------------------------------------------------------------------------------------


def current_plan(env: Mapping[str, str] | None = None) -> BuildPlan:
    env = os.environ if env is None else env
    toolkit = find_cuda_home(env) is not None
    caps = detect_gpu_capabilities() if toolkit and env_flag(env, "SPARSE_PRUNE_SM90") == "" else []
    return plan_build(env, toolkit=toolkit, gpu_capabilities=caps)


def _requires(env: Mapping[str, str] | None = None) -> list[str]:
    env = os.environ if env is None else env
    plan = current_plan(env)
    reqs = build_requires(plan, have_cutlass_path=cutlass_path_ok(env))
    what = ["_C_cpu"] * plan.cpu + ["_C"] * plan.cuda + ["_C_sm90"] * plan.sm90.build
    print(f"[sparse_prune build] will try to compile: {', '.join(what) or 'nothing (pure Python)'}"
          f"; sm90: {plan.sm90.reason}; build requirements added: {', '.join(reqs) or 'none'}",
          flush=True)
    return reqs


def get_requires_for_build_wheel(config_settings=None):
    # setuptools' hook would run setup.py just to read setup_requires (we have none) and adds
    # nothing else on setuptools >= 70; skip it so setup.py runs once, with torch present.
    return _requires()


def get_requires_for_build_editable(config_settings=None):
    return _requires()


get_requires_for_build_sdist = _st.get_requires_for_build_sdist
prepare_metadata_for_build_wheel = _st.prepare_metadata_for_build_wheel
prepare_metadata_for_build_editable = _st.prepare_metadata_for_build_editable
build_wheel = _st.build_wheel
build_sdist = _st.build_sdist
build_editable = _st.build_editable
