#!/usr/bin/env bash
# The one-row 128-head default (bf16 partials by TMA store): the MLA and decoder GPU tests, then the few-row bench rows.
#
#   bash bench/gpu/mla_one_row.sh    (device tool, nvidia-h200; $OUT gets tests.txt, mla_small_batch.json, bench.txt)
set -uo pipefail
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
. bench/gpu/names.sh
timeout 330 python3 -m pytest -q tests/gpu/test_mla_wgmma_gpu.py tests/gpu/test_mla_gpu.py tests/gpu/test_decoder_gpu.py \
  -k "not ep_ and not fp8" > "$OUT/tests.txt" 2>&1; echo "tests rc=$?"; grep -E "passed|failed|Error" "$OUT/tests.txt" | tail -5
timeout 230 python3 bench/bench_mla.py --small-batch --no-sweep --heads ${HEADS:-128 16} --json "$OUT/mla_small_batch.json" \
  > "$OUT/bench.txt" 2>&1; echo "bench rc=$?"; tail -30 "$OUT/bench.txt"
# the stage-1 trace still stamps (bits equal to an untraced launch): a short run of the trace probe
timeout 100 python3 bench/gpu/mla_trace_probe.py --reps 3 --out "$OUT/trace_check.json" > "$OUT/trace.txt" 2>&1
echo "trace rc=$?"; grep -c '"traced_equals_untraced": true' "$OUT/trace.txt"; grep -c '"traced_equals_untraced": false' "$OUT/trace.txt"
