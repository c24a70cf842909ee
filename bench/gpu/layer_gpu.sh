#!/usr/bin/env bash
# The pipeline transform on the 2-GPU machine in one go: the schedules' GPU tests, then bench/bench_layer.py
# (DeepSeek-V3 MoE layer, 128 local experts per rank), one run (and one JSON) per comm, so a comm that runs
# out of time leaves the others' results; torch.profiler traces of each comm's first case.
#
#   bash bench/gpu/layer_gpu.sh
#   COMMS="nvlink torch_decode:decode torch:prefill deepep_ll:decode deepep:prefill" DECODE=32,128 PREFILL=4096 \
#     GRAPH=1 COMPILE=1 SCHEDULES=tbo,shared_overlap bash bench/gpu/layer_gpu.sh
#   LAYER=decoder COMMS="nvlink torch_decode:decode" DECODE=32,128 PREFILL=4096 FULLGRAPH=1 bash bench/gpu/layer_gpu.sh
#
# Env: COMMS (space list, each `name` or `name:decode|prefill`; default nvlink), DECODE / PREFILL (tokens per
# rank), GRAPH=1 (--cuda-graph), COMPILE=1 (--compile), FULLGRAPH=1 (--fullgraph), SCHEDULES (--schedules),
# ITERS, TESTS (space list of tests/gpu files without .py, or test paths; default test_pipeline_gpu test_decoder_gpu;
# TESTS= runs none), LAYER (moe | decoder: bench_layer's --layer), CONTEXT (its --context), WORLD (ranks, default 2:
# WORLD=1 runs on one GPU), TOTAL (seconds,
# default 560), TAG (file suffix, default h200x2), OUT (default /tmp/out). $OUT gets pack.tgz (results/*.json and
# logs/, one log per step; packed again after every step, so a run cut short still returns what finished),
# traces.tgz and summary.txt. A comm named deepep* builds DeepEP from .deepep
# (carried; ../shared/device/prepare-deepep.sh) in the background first.
set -uo pipefail
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export PYTHONPATH=$PWD
. bench/gpu/names.sh  # nanomoe_kernels / nanomoe_reference
OUT=${OUT:-/tmp/out}; TOTAL=${TOTAL:-560}; TAG=${TAG:-h200x2}; COMMS=${COMMS:-nvlink}
WORK=/tmp/layer_work; LOGS=$WORK/logs
mkdir -p "$OUT" "$WORK/results" "$LOGS" /tmp/layer_traces
pack() { tar czf "$OUT/pack.tgz" -C "$WORK" results logs; }
touch "$OUT/summary.txt"
. bench/gpu/step.sh  # step NAME LIMIT CMD...
DEEPEP_PID=""
if [[ "$COMMS" == *deepep* && -f .deepep/build.sh ]]; then
  export PYTHONPATH=$PWD/.deepep:$PYTHONPATH
  bash .deepep/build.sh > "$LOGS/deepep_build.log" 2>&1 &
  DEEPEP_PID=$!
fi
for t in ${TESTS-test_pipeline_gpu test_decoder_gpu}; do
  f=$t; [[ "$t" == */* ]] || f="tests/gpu/$t.py"
  step "$(basename "$t" .py)" 240 python3 -m pytest -q -p no:cacheprovider -W ignore::UserWarning -rfEs "$f"
  pack
done
for c in $COMMS; do
  if [[ "$c" == deepep* && -n "$DEEPEP_PID" ]]; then
    wait "$DEEPEP_PID"; echo "DeepEP build rc=$?: $(tail -1 "$LOGS/deepep_build.log")" | tee -a "$OUT/summary.txt"
    DEEPEP_PID=""
  fi
  name=${LAYER:+${LAYER}_}${c/:/_}
  step "layer_$name" "${LIMIT:-300}" python3 bench/bench_layer.py --world-size "${WORLD:-2}" --backend nccl --comms "$c" \
    --layer "${LAYER:-moe}" ${CONTEXT:+--context "$CONTEXT"} \
    --decode-tokens "${DECODE:-32,128,256}" --prefill-tokens "${PREFILL-4096}" ${GRAPH:+--cuda-graph} \
    ${COMPILE:+--compile} ${FULLGRAPH:+--fullgraph} ${SCHEDULES:+--schedules "$SCHEDULES"} ${ITERS:+--iters "$ITERS"} \
    --profile /tmp/layer_traces --json "$WORK/results/layer_${name}_$TAG.json"
  grep -vE "Warning|warn\(" "$LOGS/layer_$name.log" | grep -E "^[a-z_]+ +(decode|prefill)|FAILED" >> "$OUT/summary.txt"
  pack
done
tar czf "$OUT/traces.tgz" -C /tmp layer_traces
cat "$OUT/summary.txt"
