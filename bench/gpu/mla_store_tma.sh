#!/usr/bin/env bash
# TMA stores of the warp-specialised MLA stage 1's split partials: the wgmma GPU tests (bits against plain stores,
# float64), then the A/B of bench/gpu/mla_trace_probe.py --variants (whole calls, interleaved rounds) and the bench.
#
#   bash bench/gpu/mla_store_tma.sh    (device tool, nvidia-h200; $OUT gets tests.txt, mla_store_tma.json)
set -uo pipefail
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
. bench/gpu/names.sh
python3 -m pytest -q -x tests/gpu/test_mla_wgmma_gpu.py > "$OUT/tests.txt" 2>&1; echo "tests rc=$?"
grep -E "passed|failed|Error" "$OUT/tests.txt" | tail -5
python3 bench/gpu/mla_trace_probe.py --variants --rounds "${ROUNDS:-5}" --out "$OUT/mla_store_tma.json" \
  > "$OUT/variants.txt" 2>&1; echo "variants rc=$?"; tail -60 "$OUT/variants.txt"
