#!/usr/bin/env bash
# The 2-GPU validation of the multi-GPU paths (issue 14), run from the repo root on a 2-GPU CUDA
# machine: the nccl-2gpu variants of tests/test_distributed.py, then bench_distributed.py on 1 and 2
# GPUs (8 layers of the Llama-8B shape, bf16 and NF4 bases, every arm). Logs, JSON and the FSDP2
# profiles go to $OUT. bitsandbytes comes as a wheel from $WHL (default .whl/).
#   TEST_TIMEOUT / BENCH_TIMEOUT bound the two parts; BENCH_ARGS adds options to the benchmark.
set -u -o pipefail
export PYTHONUNBUFFERED=1
# NVLink multicast stays off on the shared multi-GPU hosts (the scripts set it too).
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
OUT=${OUT:-/tmp/fastlora-out}
WHL=${WHL:-.whl}
mkdir -p "$OUT"
if compgen -G "$WHL/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site-dist "$WHL"/*.whl || exit 1
fi
# A folder of its own, replaced: a warm machine may hold another checkout's fastlora in /tmp/fl.
rm -rf /tmp/fl-dist
python3 -m pip install -q --no-deps --no-build-isolation --no-compile --target /tmp/fl-dist . || exit 1
export PYTHONPATH=/tmp/fl-dist:/tmp/site-dist
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/env.txt"
python3 -c "import torch, triton, transformers, bitsandbytes as b; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__, 'bnb', b.__version__, 'gpus', torch.cuda.device_count())" 2>&1 | tail -1 | tee -a "$OUT/env.txt"
rc=0
if [ "${TESTS:-1}" = 1 ]; then
    timeout "${TEST_TIMEOUT:-170}" python3 -P -m pytest tests/test_distributed.py -k nccl -q -p no:cacheprovider -rfE \
        2>&1 | tee "$OUT/pytest.log" | tail -40 || rc=1
fi
if [ "${BENCH:-1}" = 1 ]; then
    # No -P: the script imports bench/common.py from its own folder (which is not the repo root).
    timeout "${BENCH_TIMEOUT:-200}" python3 bench/bench_distributed.py --gpus 1 2 --layers 8 --warmup 2 --iters 6 \
        --profile fsdp2-torch fsdp2 --profile-out "$OUT/profile.txt" --json "$OUT/distributed.json" ${BENCH_ARGS:-} \
        2>&1 | tee "$OUT/bench.log" | grep -v '^{' || rc=1
fi
exit $rc
