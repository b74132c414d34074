#!/usr/bin/env bash
# Where FSDP2's scaling goes (issue 14): one call on a 2-GPU CUDA machine, from the repo root (or a
# staged copy of it), within ~400 s including the installs. bench_distributed.py on 1 GPU (the
# `single` baselines of both bases, the denominators, plus three FSDP2 layouts without any
# communication: FSDP2's own cost) and on 2 GPUs (DDP and every fastlora.fully_shard layout, arm by
# arm, each for bf16 then NF4, most telling first; `--budget-s` skips the arms that would end too late),
# profile tables (`single` and torch's plain FSDP2 layout at 1 GPU, that layout and the fastest
# fastlora layout per base at 2), then, in the time left, the NCCL tests of the new fully_shard
# options. Everything under $OUT:
# env.txt, bench.log, distributed.json, profile.txt, pytest.log.
#   WHL: folder of the bitsandbytes wheel (default .whl/, or ../.whl/ from a staged copy);
#   BUDGET_S: seconds for the benchmark (default 300); ITERS/WARMUP: timed/untimed steps per arm;
#   BENCH_EXTRA: more options for bench_distributed.py; INSTALL=0 uses the fastlora already importable
#   (INSTALL=0 BENCH_EXTRA=--smoke TESTS=0: the plumbing on a CPU).
set -u -o pipefail
export PYTHONUNBUFFERED=1
# NVLink multicast stays off on the shared multi-GPU hosts (the scripts set it too).
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
OUT=${OUT:-/tmp/fastlora-out}
WHL=${WHL:-$([ -d .whl ] && echo .whl || echo ../.whl)}
mkdir -p "$OUT"
if [ "${INSTALL:-1}" = 1 ]; then
    if compgen -G "$WHL/*.whl" >/dev/null; then
        python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site-fsdp "$WHL"/*.whl || exit 1
    fi
    # A folder of its own, replaced: a warm machine may hold another checkout's fastlora.
    rm -rf /tmp/fl-fsdp
    python3 -m pip install -q --no-deps --no-build-isolation --no-compile --target /tmp/fl-fsdp . || exit 1
    export PYTHONPATH=/tmp/fl-fsdp:/tmp/site-fsdp
fi
nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.max.sm,driver_version --format=csv | tee "$OUT/env.txt"
python3 -c "import torch, triton, transformers, bitsandbytes as b; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__, 'bnb', b.__version__, 'gpus', torch.cuda.device_count())" 2>&1 | tail -1 | tee -a "$OUT/env.txt"
echo "installs done at ${SECONDS} s" | tee -a "$OUT/env.txt"
rc=0
# 2-GPU arms, most telling first (what each tests: bench/NOTES.md, "Multi-GPU"): the references
# (ddp, torch's layout, the previous best fsdp2-keep), LoRA replicated (no reduce-scatters), one
# unit per 2 blocks, the NCCL CTA cap, the kept embeddings, the replicated base in one unit, the
# combinations; the memory-lean layouts (the default, then with 2 blocks per unit and/or kept
# embeddings: candidates for new defaults); then bf16 LoRA gathers, 4 blocks per unit, deeper
# prefetch, replicate per block, bf16 reduction.
ARMS2="ddp fsdp2-torch fsdp2-keep fsdp2-lrepl fsdp2-keep-lrepl fsdp2-keep-g2 fsdp2-keep-cta fsdp2-keep-emb
 fsdp2-repl-1 fsdp2-keep-g2-emb-cta fsdp2-g2-emb-lrepl fsdp2-keep-g2-emb-lrepl-cta fsdp2 fsdp2-g2 fsdp2-emb
 fsdp2-g2-emb fsdp2-keep-mp fsdp2-keep-g4 fsdp2-bwd2 fsdp2-repl fsdp2-keep-rs16"
# shellcheck disable=SC2086
timeout "$(( ${BUDGET_S:-300} + 40 ))" python3 bench/bench_distributed.py --gpus 1 2 --layers 8 \
    --warmup "${WARMUP:-3}" --iters "${ITERS:-12}" --budget-s "${BUDGET_S:-300}" \
    --one-gpu-arms single fsdp2-torch fsdp2-keep fsdp2-lrepl --arms $ARMS2 \
    --profile single fsdp2-torch --profile-gpus 1 2 --profile-best --profile-out "$OUT/profile.txt" \
    --json "$OUT/distributed.json" ${BENCH_EXTRA:-} 2>&1 | tee "$OUT/bench.log" | grep -v '^{' || rc=1
echo "benchmark done at ${SECONDS} s" | tee -a "$OUT/env.txt"
# The NCCL variants of the new options' tests, in what is left of ~400 s (the harness runs every
# scenario in one pair of processes; a timeout here costs nothing above).
left=$(( ${TOTAL_S:-400} - SECONDS ))
if [ "${TESTS:-1}" = 1 ] && [ "$left" -gt 30 ]; then
    timeout "$left" python3 -P -m pytest tests/test_distributed.py -q -p no:cacheprovider -rfE \
        -k "nccl and (grouped or one_unit or keep_embeddings or replicated_lora)" 2>&1 | tee "$OUT/pytest.log" | tail -15 || rc=1
else
    echo "pytest skipped: ${left} s left" | tee "$OUT/pytest.log"
fi
echo "all done at ${SECONDS} s" | tee -a "$OUT/env.txt"
exit $rc
