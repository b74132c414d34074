#!/usr/bin/env bash
# How the GPU numbers in bench/NOTES.md were produced: run from the repo root on a CUDA machine
# (bitsandbytes carried as a wheel in .whl/). GPU tests, then the layer benchmark; logs under $OUT.
#   TESTS=0 skips pytest, PYTEST_ARGS adds pytest options (e.g. "-m gpu"); BENCH_ARGS passes options
#   to bench_layer.py (e.g. "--quick").
set -u -o pipefail
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/fastlora-out}
mkdir -p "$OUT"
if compgen -G ".whl/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
fi
python3 -m pip install -q --no-deps --no-build-isolation --no-compile --target /tmp/fl . || exit 1
export PYTHONPATH=/tmp/fl:/tmp/site
nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.max.sm,driver_version --format=csv | tee "$OUT/env.txt"
python3 -c "import torch, triton, peft, transformers, bitsandbytes as b; print('torch', torch.__version__, 'triton', triton.__version__, 'peft', peft.__version__, 'transformers', transformers.__version__, 'bnb', b.__version__)" 2>&1 | tail -1 | tee -a "$OUT/env.txt"
if [ "${TESTS:-1}" = 1 ]; then
    timeout "${TEST_TIMEOUT:-240}" python3 -P -m pytest tests/test_kernels.py -q -p no:cacheprovider --maxfail=5 ${PYTEST_ARGS:-} 2>&1 | tee "$OUT/pytest.log" | tail -25
fi
if [ "${BENCH:-1}" = 1 ]; then
    # shellcheck disable=SC2086
    timeout "${BENCH_TIMEOUT:-300}" python3 -P bench/bench_layer.py ${BENCH_ARGS:-} --out "$OUT/layer.json" 2>&1 | tee "$OUT/bench.log"
fi
