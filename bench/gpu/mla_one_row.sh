#!/usr/bin/env bash
# The few-row 128-head defaults (bf16 partials by TMA store, the first tile alone, one-warp reductions): PROBE=1 first
# A/Bs them against the old ones (mla_small_probe.py --few-rows), then the few-row bench rows, then the MLA and
# decoder GPU tests.
#
#   [PROBE=1] bash bench/gpu/mla_one_row.sh    (device tool, nvidia-h200; $OUT gets few_rows.json, mla_small_batch.json,
#                                              bench.txt, tests.txt)
set -uo pipefail
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
. bench/gpu/names.sh
if [ -n "${PROBE:-}" ]; then
  timeout 120 python3 bench/gpu/mla_small_probe.py --few-rows --rounds 5 --out "$OUT/few_rows.json" > "$OUT/few_rows.txt" 2>&1
  echo "probe rc=$?"
fi
timeout 180 python3 bench/bench_mla.py --small-batch --no-sweep --heads ${HEADS:-128 16} --json "$OUT/mla_small_batch.json" \
  > "$OUT/bench.txt" 2>&1; echo "bench rc=$?"; tail -30 "$OUT/bench.txt"
timeout 290 python3 -m pytest -q tests/gpu/test_mla_wgmma_gpu.py tests/gpu/test_mla_gpu.py tests/gpu/test_decoder_gpu.py \
  -k "not ep_ and not fp8" > "$OUT/tests.txt" 2>&1; echo "tests rc=$?"; grep -E "passed|failed|Error" "$OUT/tests.txt" | tail -5
