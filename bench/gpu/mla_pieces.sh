#!/usr/bin/env bash
# Cache tiles in pieces (DecodeTuning.tile_pieces, kernels/mla_tile_pieces.py): its GPU tests first (same bits as
# whole tiles), the whole-call A/B at few-row and batch shapes (mla_small_probe.py --pieces: interleaved rounds,
# per-kernel times), the stage 1 timeline with and without pieces (mla_trace_probe.py --orders --order-set 1,5),
# then the rest of the wgmma MLA GPU tests.
#
#   bash bench/gpu/mla_pieces.sh    (device tool, nvidia-h200; $OUT gets tests*.txt, pieces.json, orders.json)
set -uo pipefail
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
. bench/gpu/names.sh
nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm,temperature.gpu,power.draw --format=csv | tee "$OUT/gpu.txt"
timeout 150 python3 -m pytest -q -x tests/gpu/test_mla_wgmma_gpu.py -k tile_pieces > "$OUT/tests_pieces.txt" 2>&1
rc=$?; echo "pieces tests rc=$rc"; tail -c 3000 "$OUT/tests_pieces.txt"
[ "$rc" -eq 0 ] || exit 1
timeout 240 python3 bench/gpu/mla_small_probe.py --pieces --rounds "${ROUNDS:-5}" --out "$OUT/pieces.json" \
  > "$OUT/pieces.txt" 2>&1; echo "pieces probe rc=$?"; grep -o '"variants": {.*}}, "kernels"' "$OUT/pieces.txt" \
  | sed 's/"us": \[[^]]*\], //g' | cut -c1-400
timeout 90 python3 bench/gpu/mla_trace_probe.py --orders --order-set "${ORDERS:-1,5}" --reps "${REPS:-20}" \
  --out "$OUT/orders.json" > "$OUT/orders.txt" 2>&1; echo "orders rc=$?"; tail -c 1500 "$OUT/orders.txt"
timeout 150 python3 -m pytest -q tests/gpu/test_mla_wgmma_gpu.py -k "not tile_pieces" > "$OUT/tests_rest.txt" 2>&1
echo "other wgmma tests rc=$?"; tail -3 "$OUT/tests_rest.txt"
