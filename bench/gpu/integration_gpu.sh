#!/usr/bin/env bash
# One GPU run after wiring the triton/deepgemm expert backends into the layer: GPU tests (layer with
# every backend, fused-MoE kernels, MLA with its current default tuning) and the EP MoE bench with every
# mode on the seed shape and on DeepSeek-V3 expert dims (32 local experts). Carry .whl (DeepGEMM).
set -uo pipefail
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site:$PWD
fi
. bench/gpu/names.sh  # nanomoe_kernels / nanomoe_reference
python3 -m pytest -q -p no:cacheprovider -W ignore::UserWarning tests/gpu/test_layer_gpu.py tests/gpu/test_fused_moe_gpu.py \
  tests/gpu/test_mla_gpu.py 2>&1 | tail -12 | tee -a "$OUT/run.log"
python3 bench/bench_ep_moe.py --mode all --expert-type linear --dtype bfloat16 \
  --json bench/results/ep_moe_seed_all_h200.json 2>&1 | grep -v Warn | tee -a "$OUT/run.log"
for T in 64 1024; do
  python3 bench/bench_ep_moe.py --mode all --expert-type swiglu --hidden-dim 7168 --intermediate-dim 2048 \
    --num-experts 32 --batch-size $T --dtype bfloat16 --json bench/results/ep_moe_v3_e32_t${T}_h200.json 2>&1 \
    | grep -v Warn | tee -a "$OUT/run.log"
done
cp bench/results/ep_moe_seed_all_h200.json bench/results/ep_moe_v3_e32_t*_h200.json "$OUT/" 2>/dev/null
timeout 150 python3 bench/bench_mla.py --quick --json "$OUT/mla_quick.json" 2>&1 | tail -14 | tee -a "$OUT/run.log"
