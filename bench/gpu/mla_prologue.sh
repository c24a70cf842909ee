#!/usr/bin/env bash
# The one-row 128-head MLA decode's first loads and split reduction: the wgmma GPU tests, the whole-call A/B of
# mla_small_probe.py --prologue (load order, reduction blocks and warps, PDL; interleaved rounds, per-kernel times),
# then the stage 1 timeline under each load order (mla_trace_probe.py --orders).
#
#   bash bench/gpu/mla_prologue.sh    (device tool, nvidia-h200; $OUT gets tests.txt, prologue.json, orders.json)
set -uo pipefail
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
. bench/gpu/names.sh
nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm,temperature.gpu,power.draw --format=csv | tee "$OUT/gpu.txt"
python3 -m pytest -q -x tests/gpu/test_mla_wgmma_gpu.py > "$OUT/tests.txt" 2>&1; echo "tests rc=$?"
grep -E "passed|failed|Error" "$OUT/tests.txt" | tail -5
python3 bench/gpu/mla_small_probe.py --prologue --rounds "${ROUNDS:-5}" --out "$OUT/prologue.json" \
  > "$OUT/prologue.txt" 2>&1; echo "prologue rc=$?"; tail -c 3000 "$OUT/prologue.txt"
python3 bench/gpu/mla_trace_probe.py --orders --reps "${REPS:-20}" --out "$OUT/orders.json" > "$OUT/orders.txt" 2>&1
echo "orders rc=$?"; tail -c 2500 "$OUT/orders.txt"
