#!/usr/bin/env bash
# The split reduction merged inside stage 1's grid (DecodeTuning.merge_in_grid, kernels/mla_split_merge.py): its GPU
# tests, then an A/B against the default in interleaved rounds (mla_small_probe.py --merge); BENCH=1 adds the
# few-row bench rows and the MLA / decoder GPU tests (after a default changes).
#
#   [BENCH=1] bash bench/gpu/mla_merge.sh    (device tool, nvidia-h200; $OUT gets tests_merge.txt, merge.json,
#                                            merge.txt[, mla_small_batch.json, bench.txt, tests.txt])
set -uo pipefail
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
. bench/gpu/names.sh
nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm --format=csv,noheader
timeout 240 python3 -m pytest -q tests/gpu/test_mla_split_merge_gpu.py > "$OUT/tests_merge.txt" 2>&1
echo "merge tests rc=$?"; grep -E "passed|failed|Error|assert" "$OUT/tests_merge.txt" | tail -12
timeout 150 python3 bench/gpu/mla_small_probe.py --merge --rounds ${ROUNDS:-5} --out "$OUT/merge.json" > "$OUT/merge.txt" 2>&1
echo "probe rc=$?"; python3 - "$OUT/merge.json" <<'PY'
import json, sys
for r in json.load(open(sys.argv[1]))["shapes"]:
    if "variants" in r:
        v = r["variants"]
        print(r["heads"], r["rows"], r["context"], r["paged"], {n: (x.get("median_us"), x.get("rel_err_vs_default"),
              x.get("error", "")[:80]) for n, x in v.items()}, {n: list(k)[:3] for n, k in r.get("kernels", {}).items()})
    else:
        print(r)
PY
if [ -n "${BENCH:-}" ]; then
  timeout 180 python3 bench/bench_mla.py --small-batch --no-sweep --heads ${HEADS:-128 16} --json "$OUT/mla_small_batch.json" \
    > "$OUT/bench.txt" 2>&1; echo "bench rc=$?"; tail -30 "$OUT/bench.txt"
  timeout 290 python3 -m pytest -q tests/gpu/test_mla_wgmma_gpu.py tests/gpu/test_mla_gpu.py tests/gpu/test_decoder_gpu.py \
    -k "not ep_ and not fp8" > "$OUT/tests.txt" 2>&1; echo "tests rc=$?"; grep -E "passed|failed|Error" "$OUT/tests.txt" | tail -5
fi
