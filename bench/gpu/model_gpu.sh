#!/usr/bin/env bash
# The whole model on the GPU machine (issue 12): the model's GPU tests, then bench_model.py at DeepSeek-V3 dims
# (4 layers: 1 dense + 3 MoE of 256 experts, bf16) next to transformers on one GPU, and with EP on 2 GPUs.
#
#   STAGES="tests one" bash bench/gpu/model_gpu.sh     # a first call (each call <= 10 min) ...
#   STAGES="ep" bash bench/gpu/model_gpu.sh            # ... and a second one
#
# Env: STAGES (any of: tests ep one, run in that order), BATCH (default "1 32"), PROMPT (512), STEPS (16),
# WEIGHTS (bench_model.py --expert-weights: bf16, or bf16,fp8), TOTAL (seconds, 560), ONE_LIMIT (330),
# TESTS_LIMIT (240), ONE_FLAGS and EP_FLAGS (extra bench_model.py flags of the one-GPU and the EP run, e.g.
# --compile). $OUT gets results/ (model_h200.json, model_ep_h200x2.json), logs/, summary.txt and pack.tgz.
set -uo pipefail
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export PYTHONPATH=$PWD
. bench/gpu/names.sh  # nanomoe_kernels / nanomoe_reference
OUT=${OUT:-/tmp/out}; STAGES=${STAGES:-"tests one"}; TOTAL=${TOTAL:-560}
BATCH=${BATCH:-"1 32"}; PROMPT=${PROMPT:-512}; STEPS=${STEPS:-16}; WEIGHTS=${WEIGHTS:-bf16}
RES=$OUT/results; LOGS=$OUT/logs; mkdir -p "$RES" "$LOGS"
nvidia-smi --query-gpu=name,memory.total --format=csv > "$LOGS/gpu.txt" 2>&1
python3 -c "import torch, triton, transformers; print(torch.__version__, triton.__version__, transformers.__version__)" \
  >> "$LOGS/gpu.txt" 2>&1

. bench/gpu/step.sh  # step NAME LIMIT CMD...

for stage in $STAGES; do  # in the order given
  case $stage in
    tests) step tests "${TESTS_LIMIT:-240}" python3 -m pytest -q -p no:cacheprovider -x tests/gpu/test_model_gpu.py ;;
    ep) step ep 240 python3 bench/bench_model.py --preset deepseek-v3-4l --world-size 2 --variants nanomoe \
          --batch $BATCH --prompt-len "$PROMPT" --steps "$STEPS" --decode-comm nvlink --expert-weights "$WEIGHTS" \
          ${EP_FLAGS:-} --json "$RES/model_ep_h200x2.json" ;;
    one) step one "${ONE_LIMIT:-330}" env CUDA_VISIBLE_DEVICES=0 python3 bench/bench_model.py \
           --preset deepseek-v3-4l --batch $BATCH --prompt-len "$PROMPT" --steps "$STEPS" \
           --expert-weights "$WEIGHTS" ${ONE_FLAGS:-} --json "$RES/model_h200.json" ;;
    *) echo "unknown stage $stage" | tee -a "$OUT/summary.txt" ;;
  esac
  tar -czf "$OUT/pack.tgz" -C "$OUT" results logs summary.txt 2>/dev/null
done
grep -h "^{" "$LOGS"/one.log "$LOGS"/ep.log 2>/dev/null | tail -20 >> "$OUT/summary.txt"
cat "$OUT/summary.txt"
