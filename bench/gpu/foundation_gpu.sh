#!/usr/bin/env bash
# One GPU run for the foundation issue: torch-2.11 compatibility of the CPU suite's core tests, the
# GPU layer tests, and the seed-shape benches (bf16). Writes JSON and logs under $OUT.
set -uo pipefail
export PYTHONUNBUFFERED=1
. bench/gpu/names.sh  # nanomoe_kernels / nanomoe_reference
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,clocks.sm --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee -a "$OUT/gpu.txt"
python3 -m pytest -q -p no:cacheprovider tests/test_config.py tests/test_route.py tests/test_layer.py \
  tests/gpu/test_layer_gpu.py 2>&1 | tail -15 | tee "$OUT/tests.log"
python3 bench/bench_ep_moe.py --expert-type linear --dtype bfloat16 --json "$OUT/ep_moe_seed_h200.json" 2>&1 | tee "$OUT/bench_seed.log"
python3 bench/bench_ep_moe.py --batch-size 8 --hidden-dim 256 --warmup 5 --iters 20 --json "$OUT/ep_moe_readme_h200.json" 2>&1 | tee "$OUT/bench_readme.log"
