#!/usr/bin/env bash
# L2 prefetches of the cache tiles ahead of the ring (DecodeTuning.l2_prefetch): its GPU test first (same bits),
# the whole-call A/B at few-row and batch shapes (mla_small_probe.py --prefetch: interleaved rounds, per-kernel
# times), the stage 1 timeline with and without (mla_trace_probe.py --orders --order-set 1,5), then the rest of
# the wgmma MLA GPU tests.
#
#   bash bench/gpu/mla_prefetch.sh    (device tool, nvidia-h200; $OUT gets tests*.txt, prefetch.json, orders.json)
set -uo pipefail
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
. bench/gpu/names.sh
nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm,temperature.gpu,power.draw --format=csv | tee "$OUT/gpu.txt"
timeout 150 python3 -m pytest -q -x tests/gpu/test_mla_wgmma_gpu.py -k "first_loads or narrow" \
  > "$OUT/tests_first.txt" 2>&1
rc=$?; echo "first tests rc=$rc"; tail -c 3000 "$OUT/tests_first.txt"
[ "$rc" -eq 0 ] || exit 1
timeout 240 python3 bench/gpu/mla_small_probe.py --prefetch --rounds "${ROUNDS:-5}" --out "$OUT/prefetch.json" \
  > "$OUT/prefetch.txt" 2>&1; echo "prefetch probe rc=$?"; grep -o '"variants": {.*}}, "kernels"' "$OUT/prefetch.txt" \
  | sed 's/"us": \[[^]]*\], //g' | cut -c1-400
timeout 90 python3 bench/gpu/mla_trace_probe.py --orders --order-set "${ORDERS:-1,5}" --reps "${REPS:-20}" \
  --out "$OUT/orders.json" > "$OUT/orders.txt" 2>&1; echo "orders rc=$?"; tail -c 1500 "$OUT/orders.txt"
timeout 150 python3 -m pytest -q tests/gpu/test_mla_wgmma_gpu.py -k "not first_loads and not narrow" \
  > "$OUT/tests_rest.txt" 2>&1
echo "other wgmma tests rc=$?"; tail -3 "$OUT/tests_rest.txt"
