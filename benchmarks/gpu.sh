#!/usr/bin/env bash
# `make gpu`: on a GPU machine whose python3 already has torch/Triton (no network, no venv):
# build in place, run the tests on the GPU, run the kernel and end-to-end benchmarks, print a
# summary last, and copy the results to $OUT when it is set. Results land in
# benchmarks/results/<device>/ (commit them).
set -u
export PYTHONUNBUFFERED=1
export CUDA_HOME="${CUDA_HOME:-/usr/local/cuda}"
export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}"
export MAX_JOBS="${MAX_JOBS:-16}"
PY="${PYTHON:-python3}"
status=0

$PY -m pip install --no-build-isolation --no-deps -e . || exit 1
$PY -c "import sparse_prune as sp, torch; print('sparse_prune', sp.__version__, '| torch', torch.__version__, '| CUDA extension:', sp.has_cuda_extension(), sp.extension_error() or '')"
DEV=$($PY -c "import torch; print(torch.cuda.get_device_name().replace(' ', '_'))")
RES="benchmarks/results/$DEV"
mkdir -p "$RES"

# Tests: everything (the gpu-marked ones run here, the Triton kernels on the GPU in bf16 too).
$PY -m pytest -q tests > "$RES/tests.txt" 2>&1 || status=1
tail -40 "$RES/tests.txt"

timeout 150 $PY benchmarks/gpu_kernels.py --dtype bfloat16 --out "$RES" || status=1
timeout -s INT 240 $PY -m sparse_prune.cli bench --device cuda --dtype bfloat16 --batch 1 8 64 256 \
    --sparsity 0.5 0.7 0.9 --reps 20 --out "$RES/e2e" || status=1
timeout -s INT 90 $PY -m sparse_prune.cli bench --device cuda --dtype bfloat16 --batch 1 8 --sparsity 0.9 \
    --cuda-graphs --reps 20 --out "$RES/graphs" || status=1
timeout -s INT 120 $PY -m sparse_prune.cli bench --device cuda --dtype bfloat16 --batch 64 --sparsity 0.9 \
    --formats dense shrink 2:4 bsr --compile --reps 20 --out "$RES/compiled" || status=1

$PY benchmarks/summarize.py "$RES" | tee "$RES/summary.md"
if [ -n "${OUT:-}" ]; then
    tar czf "$OUT/results.tgz" "$RES"
    cp "$RES/summary.md" "$RES/tests.txt" "$OUT/" 2>/dev/null
fi
exit $status
