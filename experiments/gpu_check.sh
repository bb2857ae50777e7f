#!/usr/bin/env bash
# The GPU check a session with a lent GPU runs (the wheels, jax[cuda12] and jax-triton from the `gpu`
# extra, are installed beforehand), from the repository root:
#
#   bash experiments/gpu_check.sh
#
# 1. `pytest -m gpu tests/kernels`: the compiled Pallas / jax-triton kernels against their references
#    (tests/kernels/gpu_test.py, jax_triton_test.py; about 1-3 minutes);
# 2. the small GPU benchmark, configs/bench/gpu.py:small (TFLOP/s of cuDNN, jax.nn xla, attnjax
#    pallas_triton and xla; under 3 minutes).
# Results go under $OUT when it is set (else /tmp/attnjax_gpu_check): pytest.log, junit.xml,
# bench/ (results.csv, results.md, plots), bench.log, env.txt. Under 10 minutes in all; exits non-zero
# if the tests fail or no GPU is visible.
set -uo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python)}"
DEST="${OUT:-/tmp/attnjax_gpu_check}"
mkdir -p "$DEST/bench"

{ nvidia-smi || true; "$PY" -c "import jax; print(jax.__version__, jax.devices())"
  "$PY" -c "import jax_triton, triton; print('jax_triton', jax_triton.__version__, 'triton', triton.__version__)"
} > "$DEST/env.txt" 2>&1
cat "$DEST/env.txt"
if ! "$PY" -c "import jax, sys; sys.exit(0 if jax.default_backend() == 'gpu' else 1)"; then
  echo "gpu_check: JAX sees no GPU (see $DEST/env.txt)" >&2
  exit 2
fi

timeout 420 "$PY" -m pytest -m gpu -q -p no:cacheprovider tests/kernels --junitxml="$DEST/junit.xml" \
  2>&1 | tee "$DEST/pytest.log"
tests_rc=${PIPESTATUS[0]}

timeout 240 "$PY" -m experiments.bench --config=configs/bench/gpu.py:small --workdir="$DEST/bench" \
  2>&1 | tee "$DEST/bench.log"
bench_rc=${PIPESTATUS[0]}

echo "gpu_check: tests exit ${tests_rc}, benchmark exit ${bench_rc}; results under $DEST"
exit $(( tests_rc != 0 ? tests_rc : bench_rc ))
