#!/usr/bin/env bash
# One GPU run for issue 4 (MLA): bf16 correctness of the Triton kernels and the MLA block, then the
# MLA bench into $OUT/mla.json. Usage (device machine, repo root):
#   bash bench/gpu/mla_gpu.sh                           # tests, then the whole bench with --tune
#   bash bench/gpu/mla_gpu.sh --small-batch --anchors   # tests, B=1/4 rows + split sweep, anchors (~3-4 min)
# Flags given replace the default --tune and go to bench_mla.py. TOTAL_S bounds the whole script
# (default 285 s), TEST_TIMEOUT the tests (110 s); the bench rewrites its JSON after every case.
set -uo pipefail
export PYTHONUNBUFFERED=1
. bench/gpu/names.sh  # nanomoe_kernels / nanomoe_reference
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
start=$SECONDS
args=("$@"); [ ${#args[@]} -eq 0 ] && args=(--tune)
nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.mem --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee -a "$OUT/gpu.txt"
timeout "${TEST_TIMEOUT:-110}" python3 -m pytest -q -p no:cacheprovider tests/gpu/test_mla_gpu.py 2>&1 \
  | tail -25 | tee "$OUT/mla_tests.log"
left=$(( ${TOTAL_S:-285} - (SECONDS - start) ))
echo "tests took $((SECONDS - start)) s; bench gets $left s"
timeout "$left" python3 bench/bench_mla.py --json "$OUT/mla.json" "${args[@]}" 2>&1 \
  | tee "$OUT/mla_bench.log" | grep -v "^decode N=\|^prefill N="
