#!/usr/bin/env bash
# `make gpu`: on a GPU machine whose python3 already has torch/Triton (no network, no venv):
# build in place, run the tests on the GPU, run the kernel and end-to-end benchmarks, print a
# summary last, and copy the results to $OUT when it is set. Results land in
# benchmarks/results/<device>/ (commit them). Exits 1 when a stage failed: a test, a kernel or
# converted model whose output disagrees with the masked dense model (status "wrong") or that
# crashed ("failed"), or a stage cut by its timeout.
#
# Stages (default all): build test kernels e2e extra. A device call is limited to 10 minutes
# and `all` is planned for about 9.5; where that is too tight, run
# `make gpu GPU_STAGES="build test"` and then `make gpu GPU_STAGES="build kernels e2e extra"`
# (a rebuild on a warm machine is a no-op).
#
# CUTLASS headers (sparse_prune._C_sm90, the Hopper 2:4 GEMM): the GPU machine has no network
# and no nvidia-cutlass. Put its wheel in .whl/ (ignored by git, see .gitignore) and carry it:
#   mkdir -p .whl && pip download --no-deps nvidia-cutlass==4.2.0.0 -d .whl
#   run(command="make gpu", carry=[".whl"])
# When neither CUTLASS_PATH nor an installed cutlass_library is there, the wheel is unzipped
# into .whl/cutlass (no pip, no site-packages change) and CUTLASS_PATH points at its headers.
set -u
export PYTHONUNBUFFERED=1
export CUDA_HOME="${CUDA_HOME:-/usr/local/cuda}"
export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}"
export MAX_JOBS="${MAX_JOBS:-16}"
PY="${PYTHON:-python3}"
STAGES="${GPU_STAGES:-build test kernels e2e extra}"
status=0
has() { [[ " $STAGES " == *" $1 "* ]]; }

if has build; then
    if [ -z "${CUTLASS_PATH:-}" ] && [ "$($PY -c 'import importlib.util as u; print(u.find_spec("cutlass_library") is not None)')" != "True" ]; then
        WHL=$(ls .whl/nvidia_cutlass-*.whl 2>/dev/null | head -1)
        if [ -n "$WHL" ]; then
            [ -d .whl/cutlass/cutlass_library/source/include ] || $PY -m zipfile -e "$WHL" .whl/cutlass
            export CUTLASS_PATH="$PWD/.whl/cutlass/cutlass_library/source"
            echo "CUTLASS headers from $WHL"
        else
            echo "no CUTLASS headers (.whl/nvidia_cutlass-*.whl not carried): the sm90 kernels are skipped"
        fi
    fi
    $PY -m pip install -q --no-build-isolation --no-deps -e . || exit 1
fi
$PY -c "import sparse_prune as sp, torch; print('sparse_prune', sp.__version__, '| torch', torch.__version__, '| CUDA extension:', sp.has_cuda_extension(), sp.extension_error() or '')"
$PY -c "from sparse_prune.kernels import sm90; print('sm90 CUTLASS extension:', sm90.has_sm90_extension(), sm90.sm90_extension_error() or '')"
DEV=$($PY -c "import torch; print(torch.cuda.get_device_name().replace(' ', '_'))")
RES="benchmarks/results/$DEV"
mkdir -p "$RES"

if has test; then
    # One autotune config per kernel: the tests check results, not speed (saves minutes of compiles).
    SPARSE_PRUNE_TUNE=0 timeout -s INT 240 $PY -m pytest -q tests > "$RES/tests.txt" 2>&1 || status=1
    tail -40 "$RES/tests.txt"
fi
if has kernels; then
    timeout -s INT 120 $PY benchmarks/gpu_kernels.py --dtype bfloat16 --out "$RES" || status=1
fi
if has e2e; then
    timeout -s INT 180 $PY -m sparse_prune.cli bench --device cuda --dtype bfloat16 --batch 1 8 64 256 \
        --formats dense shrink 2:4 csr bsr auto \
        --sparsity 0.5 0.7 0.9 --reps 10 --out "$RES/e2e" || status=1
fi
if has extra; then
    timeout -s INT 45 $PY -m sparse_prune.cli bench --device cuda --dtype bfloat16 --batch 1 8 --sparsity 0.9 \
        --cuda-graphs --reps 10 --out "$RES/graphs" || status=1
    timeout -s INT 60 $PY -m sparse_prune.cli bench --device cuda --dtype bfloat16 --batch 64 --sparsity 0.9 \
        --formats dense shrink 2:4 bsr --compile --reps 10 --out "$RES/compiled" || status=1
fi

$PY benchmarks/summarize.py "$RES" | tee "$RES/summary.md"  # wrong/failed points first
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1
if [ -n "${OUT:-}" ]; then
    tar czf "$OUT/results.tgz" "$RES"
    cp "$RES/summary.md" "$RES/tests.txt" "$OUT/" 2>/dev/null
fi
exit $status
