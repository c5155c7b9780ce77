# make test  : create .venv if missing, install torch + the project (compiles csrc/ where a
#              CUDA toolkit exists, csrc/sm90/ too: SPARSE_PRUNE_SM90=1 below), run ruff,
#              check the sdist (sdist-check) and run the test suite.
# make gpu   : GPU machine only: build in place with its torch, tests, benchmarks (benchmarks/gpu.sh).
# make gpu-compile : every Triton kernel x autotune config x dtype x flag compiled for sm_80 and
#              sm_90 on the CPU (shared memory, tensor-core MMA; sparse_prune/kernels/triton_aot.py).
# make demo  : same set-up, then the main job (`sparse-prune demo`: pruning, latency vs dense,
#              the quick accuracy study; results/demo/report.md).
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

# torch guesses /usr/local when CUDA_HOME is unset and then fails to link -lcudart.
export CUDA_HOME ?= /usr/local/cuda
export TORCH_CUDA_ARCH_LIST ?= 8.0;9.0
# A plain `pip install .` builds the Hopper extension (sparse_prune._C_sm90) only for an sm_90
# GPU or 9.0a in TORCH_CUDA_ARCH_LIST; `make` (and so CI: .ci/run -> make test) asks for it so
# that its compile stays proven on every machine with a toolkit. `SPARSE_PRUNE_SM90=0 make` skips it.
export SPARSE_PRUNE_SM90 ?= 1
# MAX_JOBS: unset, setup.py picks one per extension from the usable cores and available memory
# (build_tools/sparse_prune_build.py: default_max_jobs); set it to override.

.PHONY: setup test demo lint clean gpu micro gpu-compile sdist-check

# CUTLASS headers for the sm_90a extension (sparse_prune._C_sm90): the nvidia-cutlass wheel
# carries them under cutlass_library/source; --no-deps because only the headers are used.
CUTLASS_PIN ?= nvidia-cutlass==4.2.0.0

$(STAMP): pyproject.toml setup.py build_tools/sparse_prune_build.py $(wildcard csrc/*) $(wildcard csrc/cpu/*) $(wildcard csrc/sm90/*)
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet setuptools wheel ninja
	$(BIN)/pip install --quiet "torch>=2.6"
	$(BIN)/pip install --quiet --no-deps "$(CUTLASS_PIN)"
	$(BIN)/pip install --no-build-isolation -e ".[dev]"
	$(BIN)/python -c "import sparse_prune as sp; print('sparse_prune', sp.__version__, '| CUDA extension loaded:', sp.has_cuda_extension(), '|', sp.extension_error() or 'ok')"
	$(BIN)/python -c "from sparse_prune.kernels import sm90; print('sm90 CUTLASS extension loaded:', sm90.has_sm90_extension(), '|', sm90.sm90_extension_error() or 'ok')"
	$(BIN)/python -c "import sparse_prune as sp; print('CPU kernels loaded:', sp.ops.has_cpu_extension(), '| float32 runs on:', sp.ops.cpu_isa(), '|', sp.ops.cpu_extension_error() or 'ok')"
	touch $(STAMP)

setup: $(STAMP)

lint: setup
	$(BIN)/ruff check sparse_prune tests benchmarks setup.py build_tools

# Build the sdist, check it against `git ls-files` (sm90 headers, csrc/cpu, tests/conftest.py,
# LICENSE, py.typed, ...) and pip-install it with SPARSE_PRUNE_CUDA=0 into a throwaway venv that
# borrows .venv's torch (--no-build-isolation: nothing is downloaded; ~1-2 min, the CPU kernels).
sdist-check: setup
	$(BIN)/python build_tools/check_sdist.py

test: setup lint sdist-check
	$(BIN)/python -m pytest -q

# The full ahead-of-time sweep (make test compiles a representative subset). Kernels land in
# Triton's cache (TRITON_CACHE_DIR), keyed by source hash: a rerun without kernel changes is quick.
AOT_JOBS ?= 2
gpu-compile: setup
	env -u TRITON_INTERPRET $(BIN)/python -m sparse_prune.kernels.triton_aot --jobs $(AOT_JOBS)

demo: setup
	$(BIN)/sparse-prune demo --attention sparse_prune --out results/demo

# CPU micro-benchmarks (pytest-benchmark), not part of `make test`.
micro: setup
	$(BIN)/python -m pytest benchmarks/test_micro.py --benchmark-only --benchmark-columns=median,iqr,rounds -q

# On a GPU machine with torch already installed (no venv, no network): build, test, benchmark.
# Two calls fit the device budget (15 min per task, <= 10 min per call; benchmarks/gpu.sh):
#   make gpu                                   (build + gpu tests)
#   make gpu GPU_STAGES="kernels e2e more extra" GPU_BUDGET_S=<seconds left>
GPU_STAGES ?= build test
GPU_BUDGET_S ?= 540
gpu:
	GPU_STAGES="$(GPU_STAGES)" GPU_BUDGET_S="$(GPU_BUDGET_S)" bash benchmarks/gpu.sh

clean:
	rm -rf build dist *.egg-info sparse_prune/_C*.so
