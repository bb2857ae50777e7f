#!/usr/bin/env bash
# The GPU check a session with a lent GPU runs (with the `gpu` extra installed), from the repository
# root:
#
#   bash experiments/gpu_check.sh
#
# The lent H200 has jax 0.11.2 (CUDA 13 plugin), Triton 3.6 and Python 3.12, and reaches no network:
# the pure-Python packages it lacks travel as wheels in the git-ignored .whl/, fetched here with
#   pip download --no-deps --only-binary=:all: --python-version 3.12 -d .whl \
#     jax-triton==0.3.1 ml-collections==1.1.0 beartype==0.23.1
# (jax-triton 0.4 asks for Triton >= 3.7), and the run begins with
#   pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
#
# 1. `pytest -m gpu tests/kernels`: the compiled Pallas / jax-triton kernels against their references
#    (tests/kernels/gpu_test.py, flex_mosaic_gpu_test.py, jax_triton_test.py; about 1-2 minutes);
# 2. the small GPU benchmark, configs/bench/gpu.py:small (TFLOP/s of cuDNN and the attnjax kernels at
#    the issue's target shapes; about 3 minutes);
# 3. the tile sweep, experiments/gpu_tiles.py (flex kernels at B=2, T=8192, N=16, H=128 causal bf16;
#    about a minute).
# Results go under $OUT when it is set (else /tmp/attnjax_gpu_check), seven files, no folders:
# env.txt, pytest.log, bench.log, results.csv, results.md (the benchmark's), tiles.csv, tiles.log.
# Under 9 minutes in all (each step has its own time limit); exits non-zero if the tests fail or no
# GPU is visible.
set -uo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3)}"
DEST="${OUT:-/tmp/attnjax_gpu_check}"
BENCH_DIR="$(mktemp -d)"
mkdir -p "$DEST"
export XLA_PYTHON_CLIENT_PREALLOCATE=false PYTHONUNBUFFERED=1

{ nvidia-smi || true; "$PY" -c "import jax, jaxlib; print('jax', jax.__version__, 'jaxlib', jaxlib.__version__, jax.devices())"
  "$PY" -c "import sys; print(sys.version)"
  "$PY" -c "import jax_triton, triton; print('jax_triton', jax_triton.__version__, 'triton', triton.__version__)"
} > "$DEST/env.txt" 2>&1
cat "$DEST/env.txt"
if ! "$PY" -c "import jax, sys; sys.exit(0 if jax.default_backend() == 'gpu' else 1)"; then
  echo "gpu_check: JAX sees no GPU (see $DEST/env.txt)" >&2
  exit 2
fi

# Four workers: the tests are compile-bound (each worker takes GPU memory as it needs it).
timeout 150 "$PY" -m pytest -m gpu -q -p no:cacheprovider -n 4 -rfE --durations=15 tests/kernels \
  2>&1 | tee "$DEST/pytest.log"
tests_rc=${PIPESTATUS[0]}

timeout 180 "$PY" -m experiments.bench --config=configs/bench/gpu.py:small --workdir="$BENCH_DIR" \
  2>&1 | tee "$DEST/bench.log"
bench_rc=${PIPESTATUS[0]}
cp "$BENCH_DIR/results.csv" "$BENCH_DIR/results.md" "$DEST/" 2>/dev/null

timeout 100 "$PY" -m experiments.gpu_tiles --out="$DEST/tiles.csv" 2>&1 | tee "$DEST/tiles.log"
tiles_rc=${PIPESTATUS[0]}

echo "gpu_check: tests exit ${tests_rc}, benchmark exit ${bench_rc}, tiles exit ${tiles_rc}; results under $DEST"
exit $(( tests_rc != 0 ? tests_rc : bench_rc != 0 ? bench_rc : tiles_rc ))
