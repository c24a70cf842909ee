#!/usr/bin/env bash
# Second integration run: the DeepGEMM masked path with an unaligned capacity, and the EP MoE layer with
# every backend where the sync-free ones (triton, deepgemm) are timed as CUDA-graph replays. Carry .whl.
set -uo pipefail
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  && export PYTHONPATH=/tmp/site:$PWD
. bench/gpu/names.sh  # nanomoe_kernels / nanomoe_reference
python3 -m pytest -q -p no:cacheprovider -W ignore::UserWarning tests/gpu/test_layer_gpu.py -k "deepgemm or triton" \
  2>&1 | tail -4 | tee -a "$OUT/run.log"
python3 bench/bench_ep_moe.py --mode all --cuda-graph --expert-type linear --dtype bfloat16 \
  --json bench/results/ep_moe_seed_graph_h200.json 2>&1 | grep -v Warn | tee -a "$OUT/run.log"
for T in 64 256 1024 4096; do
  python3 bench/bench_ep_moe.py --mode all --cuda-graph --expert-type swiglu --hidden-dim 7168 --intermediate-dim 2048 \
    --num-experts 32 --batch-size $T --dtype bfloat16 --json bench/results/ep_moe_v3_e32_t${T}_graph_h200.json 2>&1 \
    | grep -v Warn | tee -a "$OUT/run.log"
done
cp bench/results/*_graph_h200.json "$OUT/"
