#!/bin/bash
# One GPU-machine call for issue 3 (Triton fused MoE + DeepGEMM adapter): install the carried wheels,
# run the GPU tests, tune the block configs for the required shapes, then the bench. From the repo root:
#   bash bench/gpu/fused_moe_gpu.sh          (device tool: carry .whl; results land in $OUT)
# Writes $OUT/run.log, gpu_tests.log, dgwarm.log, tune_swiglu.json, tune_linear.json, tuned.tar (the new
# kernels/tuned/*.json), expert_ffn.json (the bench record). Prints a short table last.
set -u -o pipefail
OUT=${OUT:-/tmp/fused_moe_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
exec > >(tee -a "$OUT/run.log") 2>&1
t0=$(date +%s)
stamp() { echo "[$(( $(date +%s) - t0 ))s] $*"; }
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target .site .whl/*.whl \
    || echo "wheel install failed"
fi
export PYTHONPATH=$PWD/.site:$PWD
. bench/gpu/names.sh  # nanomoe_kernels / nanomoe_reference
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem,temperature.gpu,power.draw --format=csv
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
python3 -c "import deep_gemm; print('deep_gemm', deep_gemm.__version__)" 2>&1 | tail -1

stamp "background: DeepGEMM JIT warm-up (one process per token count) and the GPU tests"
warm=()
for T in 64 256 1024 4096; do
  timeout 150 python3 bench/bench_expert_ffn.py --tokens "$T" --experts 32 --variants deepgemm --warm-only \
    >> "$OUT/dgwarm.log" 2>&1 &
  warm+=($!)
done
timeout 120 python3 -m pytest -q -m gpu tests/gpu/test_fused_moe_gpu.py > "$OUT/gpu_tests.log" 2>&1 &
tests=$!
stamp "compile the tuning candidates in parallel"
timeout 80 python3 bench/tune_fused_moe.py --compile-only --jobs 10
timeout 40 python3 bench/tune_fused_moe.py --compile-only --jobs 6 --expert-type linear --experts 256 \
  --hidden 2048 --tokens 128
# wait on our own jobs only: a bare `wait` would also wait for the tee above, which never ends
wait "$tests"
stamp "GPU tests:"; tail -n 4 "$OUT/gpu_tests.log"
stamp "tune (timing)"
timeout 100 python3 bench/tune_fused_moe.py --log "$OUT/tune_swiglu.json"
timeout 30 python3 bench/tune_fused_moe.py --expert-type linear --experts 256 --hidden 2048 --tokens 128 \
  --log "$OUT/tune_linear.json"
tar cf "$OUT/tuned.tar" -C kernels tuned
wait "${warm[@]}"
stamp "bench"
timeout 120 python3 bench/bench_expert_ffn.py --quick --seed-shape --json "$OUT/expert_ffn.json"
stamp "done"
