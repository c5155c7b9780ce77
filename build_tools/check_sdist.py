"""CI check of the sdist (``make sdist-check``, part of ``make test``).

1. Build the sdist with the project's own PEP 517 backend (``build_sdist``).
2. Compare its file list with ``git ls-files``: every tracked file under csrc/ (the sm90
   headers included), sparse_prune/, tests/ (conftest.py included), build_tools/, docs/ and
   benchmarks/ (not benchmarks/results/), plus LICENSE, README.md, pyproject.toml, setup.py,
   MANIFEST.in, Makefile and sparse_prune/py.typed must be in it.
3. Install it into a throwaway venv with ``SPARSE_PRUNE_CUDA=0`` (so only the CPU kernels,
   csrc/cpu/, compile: about a minute on two cores) and ``--no-build-isolation``: the venv sees
   this interpreter's site-packages (torch, setuptools) through a .pth file, so nothing is
   downloaded. Then import it from outside the checkout: the installed copy must be the one
   imported, load its CPU kernels, carry py.typed and LICENSE, and run its console script.

Usage: python build_tools/check_sdist.py [--keep DIR] [--no-install]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import sysconfig
import tarfile
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "build_tools"))
import sparse_prune_build as spb  # noqa: E402


def _say(msg: str) -> None:
    print(f"[sdist-check] {msg}", flush=True)


def tracked_files() -> list[str]:
    """``git ls-files`` of the checkout, or a walk of the tree when it is not a git checkout."""
    try:
        out = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True)
        return [p for p in out.stdout.decode().split("\0") if p and (ROOT / p).exists()]
    except (OSError, subprocess.CalledProcessError):
        skip = {"__pycache__", ".venv", "build", "dist", ".git"}
        files = []
        for dirpath, dirnames, filenames in os.walk(ROOT):
            dirnames[:] = [d for d in dirnames if d not in skip and not d.endswith(".egg-info")]
            for f in filenames:
                if not f.endswith((".so", ".o", ".pyc")):
                    files.append(str((Path(dirpath) / f).relative_to(ROOT)))
        return files


def build_sdist(outdir: Path) -> Path:
    code = ("import sys; sys.path.insert(0, 'build_tools'); import sparse_prune_build as b; "
            "print(b.build_sdist(sys.argv[1]))")
    # The sdist's contents do not depend on what would compile (MANIFEST.in grafts csrc/); with
    # both flags off setup.py neither imports torch nor probes GPUs.
    env = {**os.environ, "SPARSE_PRUNE_CUDA": "0", "SPARSE_PRUNE_CPU": "0"}
    out = subprocess.run([sys.executable, "-c", code, str(outdir)], cwd=ROOT, env=env,
                         capture_output=True, text=True)
    if out.returncode != 0:
        sys.stderr.write(out.stdout + out.stderr)
        raise SystemExit(f"building the sdist failed (exit {out.returncode})")
    return outdir / out.stdout.strip().splitlines()[-1]


def check_contents(sdist: Path) -> list[str]:
    with tarfile.open(sdist) as tar:
        names = tar.getnames()
    required = spb.sdist_required(tracked_files())
    missing = spb.missing_from_sdist(names, required)
    if missing:
        raise SystemExit(f"{sdist.name} lacks {len(missing)} required file(s) (add them to "
                         f"MANIFEST.in): {', '.join(missing)}")
    _say(f"{sdist.name}: {len(names)} members; all {len(required)} required files present "
         "(csrc/sm90/*.h, *.cuh, csrc/cpu/*, tests/conftest.py, LICENSE, py.typed among them)")
    return names


def install_and_import(sdist: Path, work: Path) -> None:
    venv = work / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    vpy = venv / "bin" / "python"
    purelib = Path(subprocess.run([str(vpy), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                                  capture_output=True, text=True, check=True).stdout.strip())
    # This interpreter's packages (torch, setuptools, pip), after the venv's own.
    (purelib / "_parent_site.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH",)}
    env["SPARSE_PRUNE_CUDA"] = "0"
    t0 = time.monotonic()
    out = subprocess.run([str(vpy), "-m", "pip", "install", "--no-build-isolation", "--no-deps",
                          "--no-index", "--quiet", str(sdist)], cwd=work, env=env,
                         capture_output=True, text=True)
    if out.returncode != 0:
        sys.stderr.write(out.stdout[-6000:] + out.stderr[-6000:])
        raise SystemExit(f"pip install of {sdist.name} failed (exit {out.returncode})")
    _say(f"installed {sdist.name} (SPARSE_PRUNE_CUDA=0) into a throwaway venv in "
         f"{time.monotonic() - t0:.0f} s")
    probe = (
        "import importlib.metadata as md, pathlib, sys\n"
        "import sparse_prune as sp\n"
        "f = pathlib.Path(sp.__file__).resolve()\n"
        "assert str(f).startswith(sys.argv[1]), f'imported {f}, not the installed copy'\n"
        "assert (f.parent / 'py.typed').exists(), 'py.typed not installed'\n"
        "assert any(p.name == 'LICENSE' for p in md.files('sparse_prune')), 'LICENSE not in the dist-info'\n"
        "assert sp.ops.has_cpu_extension(), f'CPU kernels not loaded: {sp.ops.cpu_extension_error()}'\n"
        "print('imported', f.parent, '| CPU kernels:', sp.ops.cpu_isa(), '| CUDA extension:', sp.has_cuda_extension())\n"
    )
    out = subprocess.run([str(vpy), "-c", probe, str(venv.resolve())], cwd=work, env=env,
                         capture_output=True, text=True)
    if out.returncode != 0:
        sys.stderr.write(out.stdout + out.stderr)
        raise SystemExit("the installed sdist does not import as expected")
    _say(out.stdout.strip().splitlines()[-1])
    out = subprocess.run([str(venv / "bin" / "sparse-prune"), "--help"], cwd=work, env=env,
                         capture_output=True, text=True)
    if out.returncode != 0:
        sys.stderr.write(out.stdout + out.stderr)
        raise SystemExit("the installed `sparse-prune --help` failed")
    _say("`sparse-prune --help` runs from the installed copy")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--keep", type=Path, help="work in this folder and keep it")
    ap.add_argument("--no-install", action="store_true", help="only build and check the file list")
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="sparse_prune-sdist-") as tmp:
        work = args.keep or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        t0 = time.monotonic()
        sdist = build_sdist(work)
        _say(f"built {sdist.name} in {time.monotonic() - t0:.1f} s")
        check_contents(sdist)
        if not args.no_install:
            install_and_import(sdist, work)


if __name__ == "__main__":
    main()
