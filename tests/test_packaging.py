"""Packaging (issue 20): the build decisions as pure functions, the build backend's
requirements, and the sdist's contents (built for real: a few seconds, no compiling)."""

from __future__ import annotations

import re
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "build_tools"))
import sparse_prune_build as spb  # noqa: E402

GiB = 2**30


# --- sm90 gating ---------------------------------------------------------------------------

@pytest.mark.parametrize(
    ("env", "caps", "build", "strict"),
    [
        ({}, [], False, False),                                        # CPU machine with nvcc
        ({}, [(8, 0)], False, False),                                  # A100: cannot run it
        ({}, [(8, 0), (9, 0)], True, False),                           # an H100/H200 present
        ({"TORCH_CUDA_ARCH_LIST": "8.0;9.0"}, [], False, False),       # 9.0 is not 9.0a
        ({"TORCH_CUDA_ARCH_LIST": "8.0;9.0a"}, [], True, False),
        ({"TORCH_CUDA_ARCH_LIST": "9.0a+PTX"}, [], True, False),
        ({"TORCH_CUDA_ARCH_LIST": "8.0 9.0A"}, [], True, False),
        ({"TORCH_CUDA_ARCH_LIST": "10.0a"}, [], False, False),
        ({"SPARSE_PRUNE_SM90": "1"}, [], True, True),                  # asked: make test, CI
        ({"SPARSE_PRUNE_SM90": "0"}, [(9, 0)], False, False),          # refused beats a GPU
        ({"SPARSE_PRUNE_SM90": "0", "TORCH_CUDA_ARCH_LIST": "9.0a"}, [], False, False),
        ({"SPARSE_PRUNE_SM90": " 1 "}, [], True, True),
    ],
)
def test_sm90_decision(env, caps, build, strict):
    d = spb.sm90_decision(env, caps)
    assert (d.build, d.strict) == (build, strict), d.reason
    assert d.reason


def test_sm90_decision_says_how_to_ask():
    assert "SPARSE_PRUNE_SM90=1" in spb.sm90_decision({}, []).reason
    assert "sm_80" in spb.sm90_decision({}, [(8, 0)]).reason


@pytest.mark.parametrize("name", ["SPARSE_PRUNE_SM90", "SPARSE_PRUNE_CUDA", "SPARSE_PRUNE_CPU"])
def test_bad_flag_is_an_error(name):
    with pytest.raises(SystemExit, match=name):
        spb.plan_build({name: "yes"}, toolkit=True)


# --- what compiles, and what the isolated build environment gets ---------------------------

def test_plan_default_with_nvcc_and_no_gpu():
    plan = spb.plan_build({}, toolkit=True, gpu_capabilities=[])
    assert (plan.cpu, plan.cuda, plan.sm90.build) == (True, True, False)
    assert spb.build_requires(plan, have_cutlass_path=False) == [spb.TORCH_REQ, spb.NINJA_REQ]


def test_plan_on_hopper_pulls_cutlass_unless_cutlass_path():
    plan = spb.plan_build({}, toolkit=True, gpu_capabilities=[(9, 0)])
    assert plan.sm90.build
    assert spb.CUTLASS_REQ in spb.build_requires(plan, have_cutlass_path=False)
    assert spb.CUTLASS_REQ not in spb.build_requires(plan, have_cutlass_path=True)


def test_plan_cuda_off_never_builds_sm90_nor_pulls_cutlass():
    plan = spb.plan_build({"SPARSE_PRUNE_CUDA": "0", "SPARSE_PRUNE_SM90": "1"}, toolkit=True,
                          gpu_capabilities=[(9, 0)])
    assert (plan.cpu, plan.cuda, plan.sm90.build) == (True, False, False)
    assert spb.build_requires(plan, have_cutlass_path=False) == [spb.TORCH_REQ, spb.NINJA_REQ]


def test_plan_without_toolkit():
    plan = spb.plan_build({"SPARSE_PRUNE_SM90": "1"}, toolkit=False)
    assert (plan.cuda, plan.sm90.build) == (False, False)
    strict = spb.plan_build({"SPARSE_PRUNE_CUDA": "1"}, toolkit=False)
    assert strict.cuda and strict.cuda_strict  # setup.py then fails with the reason


def test_nothing_compiles_nothing_required():
    plan = spb.plan_build({"SPARSE_PRUNE_CUDA": "0", "SPARSE_PRUNE_CPU": "0"}, toolkit=True,
                          gpu_capabilities=[(9, 0)])
    assert not plan.compiles
    assert spb.build_requires(plan, have_cutlass_path=False) == []


def test_backend_hook_follows_the_environment(monkeypatch):
    for name in ("SPARSE_PRUNE_SM90", "TORCH_CUDA_ARCH_LIST", "CUTLASS_PATH"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("SPARSE_PRUNE_CUDA", "0")
    monkeypatch.setenv("SPARSE_PRUNE_CPU", "0")
    assert spb.get_requires_for_build_wheel() == []
    monkeypatch.delenv("SPARSE_PRUNE_CPU")
    assert spb.get_requires_for_build_editable() == [spb.TORCH_REQ, spb.NINJA_REQ]
    if spb.find_cuda_home() is None:
        pytest.skip("no CUDA toolkit here: the sm90 half of this test needs nvcc")
    monkeypatch.setenv("SPARSE_PRUNE_CUDA", "1")
    monkeypatch.setenv("SPARSE_PRUNE_SM90", "1")
    assert spb.CUTLASS_REQ in spb.get_requires_for_build_wheel()
    monkeypatch.setenv("SPARSE_PRUNE_SM90", "0")
    assert spb.CUTLASS_REQ not in spb.get_requires_for_build_wheel()


def test_pyproject_build_system_has_no_compile_only_dependency():
    tomllib = pytest.importorskip("tomllib")
    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())
    bs = meta["build-system"]
    assert bs["build-backend"] == "sparse_prune_build" and bs["backend-path"] == ["build_tools"]
    names = {re.split(r"[<>=!~ ;\[]", r, maxsplit=1)[0].lower() for r in bs["requires"]}
    assert names == {"setuptools", "wheel"}
    assert meta["project"]["license"] == "Apache-2.0"
    assert (ROOT / "LICENSE").read_text().lstrip().startswith("Apache License")


def test_make_test_asks_for_sm90():
    """CI (.ci/run -> make test) keeps proving the sm90 compile: the Makefile asks for it."""
    mk = (ROOT / "Makefile").read_text()
    assert re.search(r"^export SPARSE_PRUNE_SM90 \?= 1$", mk, re.M)
    assert re.search(r"^test:.*\bsdist-check\b", mk, re.M)
    assert "make test" in (ROOT / ".ci" / "run").read_text()


# --- MAX_JOBS ---------------------------------------------------------------------------------

@pytest.mark.parametrize(
    ("cpus", "mem", "job", "jobs"),
    [
        (2, 21 * GiB, 6 * GiB, 2),      # this 2-core build machine, CUTLASS units
        (16, 128 * GiB, 6 * GiB, 16),   # the H200 machine
        (16, 20 * GiB, 6 * GiB, 3),     # many cores, little memory: memory decides
        (4, 1 * GiB, 6 * GiB, 1),       # never zero
        (8, None, 2 * GiB, 8),          # memory unknown: cores alone
        (0, 64 * GiB, 2 * GiB, 1),
    ],
)
def test_default_max_jobs(cpus, mem, job, jobs):
    assert spb.default_max_jobs(cpus, mem, job) == jobs


def test_cutlass_jobs_budget_more_memory_than_the_others():
    mem = 16 * GiB
    sm90 = spb.default_max_jobs(8, mem, spb.JOB_MEMORY_BYTES["sparse_prune._C_sm90"])
    cpu = spb.default_max_jobs(8, mem, spb.JOB_MEMORY_BYTES["sparse_prune._C_cpu"])
    assert sm90 == 2 and cpu == 8


def test_machine_parsers():
    assert spb.parse_cgroup_cpu_max("200000 100000\n") == 2
    assert spb.parse_cgroup_cpu_max("150000 100000") == 2
    assert spb.parse_cgroup_cpu_max("max 100000") is None
    assert spb.parse_cgroup_cpu_max(None) is None
    assert spb.parse_meminfo_available("MemTotal: 100 kB\nMemAvailable:   2048 kB\n") == 2 * 2**20
    assert spb.parse_meminfo_available("MemTotal: 100 kB\n") is None
    assert spb.parse_cgroup_memory("max\n", "5") is None
    assert spb.parse_cgroup_memory(f"{8 * GiB}\n", f"{3 * GiB}\n") == 5 * GiB
    assert spb.parse_compute_caps("9.0\n8.0\n\n") == [(9, 0), (8, 0)]
    assert spb.parse_compute_caps("No devices were found\n") == []
    assert spb.machine_cpus() >= 1


# --- the sdist --------------------------------------------------------------------------------

def test_missing_from_sdist_is_pure():
    names = ["p-1/", "p-1/csrc/a.h", "p-1/tests/conftest.py"]
    assert spb.missing_from_sdist(names, ["csrc/a.h", "tests/conftest.py"]) == []
    assert spb.missing_from_sdist(names, ["csrc/sm90/b.cuh", "csrc/a.h"]) == ["csrc/sm90/b.cuh"]
    req = spb.sdist_required(["csrc/x.cu", "benchmarks/results/r.json", "benchmarks/b.py", ".gitignore"])
    assert "csrc/x.cu" in req and "benchmarks/b.py" in req and "LICENSE" in req
    assert "benchmarks/results/r.json" not in req and ".gitignore" not in req


@pytest.fixture(scope="module")
def sdist_names(tmp_path_factory):
    pytest.importorskip("setuptools")
    out = tmp_path_factory.mktemp("sdist")
    sys.path.insert(0, str(ROOT / "build_tools"))
    import check_sdist

    return tarfile.open(check_sdist.build_sdist(out)).getnames()


def test_sdist_has_what_builds_and_tests_need(sdist_names):
    have = {n.split("/", 1)[1] for n in sdist_names if "/" in n}
    must = {"csrc/sm90/semi24_sm90.h", "csrc/sm90/semi24_sm90_kernel.cuh", "tests/conftest.py",
            "LICENSE", "sparse_prune/py.typed", "build_tools/sparse_prune_build.py", "setup.py",
            "MANIFEST.in"}
    must |= {f"csrc/cpu/{p.name}" for p in (ROOT / "csrc" / "cpu").iterdir()}
    assert must <= have, sorted(must - have)
    assert not [n for n in have if n.endswith((".so", ".pyc"))]


def test_sdist_matches_git_ls_files(sdist_names):
    try:
        tracked = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True,
                                 check=True).stdout.split()
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout (running from an sdist?)")
    tracked = [p for p in tracked if (ROOT / p).exists()]
    assert spb.missing_from_sdist(sdist_names, spb.sdist_required(tracked)) == []
