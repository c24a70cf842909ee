#!/usr/bin/env bash
# The pipeline transform on the 2-GPU machine in one go: the schedules' GPU test, then bench/bench_layer.py
# (DeepSeek-V3 MoE layer, 128 local experts per rank) for each comm, decode and prefill sizes, with
# torch.profiler traces of the first decode case.
#
#   bash bench/gpu/layer_gpu.sh
#   COMMS=torch,nvlink DECODE=32,128 PREFILL=4096 COMPILE=1 GRAPH=1 bash bench/gpu/layer_gpu.sh
#
# Env: COMMS (default torch,nvlink), DECODE / PREFILL (tokens per rank), COMPILE=1 (adds --compile), GRAPH=1
# (adds --cuda-graph), TESTS=0
# (skip the test), TOTAL (seconds, default 540), OUT (default /tmp/out). $OUT gets results/*.json,
# traces.tgz and summary.txt.
set -uo pipefail
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export PYTHONPATH=$PWD
. bench/gpu/names.sh  # nanomoe_kernels / nanomoe_reference
OUT=${OUT:-/tmp/out}; TOTAL=${TOTAL:-540}; TAG=h200x2
mkdir -p "$OUT/results" /tmp/layer_logs /tmp/layer_traces
: > "$OUT/summary.txt"
LOGS=/tmp/layer_logs
. bench/gpu/step.sh  # step NAME LIMIT CMD...
if [ "${TESTS:-1}" != 0 ]; then
  step test_pipeline_gpu 240 python3 -m pytest -q -p no:cacheprovider -W ignore::UserWarning -rfEs tests/gpu/test_pipeline_gpu.py
fi
step bench_layer 420 python3 bench/bench_layer.py --world-size 2 --backend nccl --comms "${COMMS:-torch,nvlink}" \
  --decode-tokens "${DECODE:-32,128,256}" --prefill-tokens "${PREFILL-4096}" ${COMPILE:+--compile} ${GRAPH:+--cuda-graph} \
  --profile /tmp/layer_traces --json "$OUT/results/layer_$TAG.json"
grep -vE "Warning|warn\(" /tmp/layer_logs/bench_layer.log | grep -E "^[a-z_]+ +(decode|prefill)|FAILED" >> "$OUT/summary.txt"
tail -5 /tmp/layer_logs/test_pipeline_gpu.log >> "$OUT/summary.txt" 2>/dev/null
tar czf "$OUT/traces.tgz" -C /tmp layer_traces
tar czf "$OUT/logs.tgz" -C /tmp layer_logs
cat "$OUT/summary.txt"
