#!/usr/bin/env bash
# FP8 (issue 14) in one device call: the FP8 GPU tests, the FP8 tuner, the expert-FFN bench with the FP8
# rows beside bf16 `triton`, DeepGEMM and SGLang (same process, same run), and FP8 dispatch on 2 GPUs.
#
#   STAGES="tests tune ffn ep" bash bench/gpu/fp8_gpu.sh     (device tool, nvidia-h200-x2; carry .whl, .peers
#                                                            and, for deepep, .deepep)
#
# Env: TUNE_FLAGS (extra tuner flags), TUNE_MODES (kernel variants tuned one after the other: any of w8a8
# w8a16 hilo w8a8_tiles hilo_tiles; default w8a8), STAGES (any of: tests tune ffn
# ffn_eager breakdown ep deepep; ffn times the sync-free variants as
# CUDA-graph replays, ffn_eager all of them eagerly), TOTAL (seconds, 570), TUNE_EXPERTS ("32"), TUNE_TOKENS
# ("64 256 1024 4096"), FFN_FLAGS (extra bench_expert_ffn flags), TESTS (single-GPU test files, run on GPU 1
# while GPU 0 tunes and times), EP_TESTS (2-GPU test files), DISPATCH_FLAGS (bench_dispatch flags; DISPATCH=0
# skips the bench).
# "deepep" builds DeepEP from .deepep first (about 75 s) so the deepep tests and rows run.
# $OUT gets results.tgz (results/: expert_ffn_fp8_h200.json, dispatch_fp8_h200x2.json, tune_fp8_*.json,
# tuned.tar; logs/) and summary.txt.
set -uo pipefail
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
OUT=${OUT:-/tmp/out}; STAGES=${STAGES:-"tests tune ffn ep"}; TOTAL=${TOTAL:-570}
RES=$OUT/results; LOGS=$OUT/logs; mkdir -p "$RES" "$LOGS"
has() { [[ " $STAGES " == *" $1 "* ]]; }
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target .site .whl/*.whl \
    > "$LOGS/wheels.log" 2>&1 || echo "wheel install failed" | tee -a "$OUT/summary.txt"
fi
export PYTHONPATH=$PWD/.site:$PWD
. bench/gpu/names.sh  # nanomoe_kernels / nanomoe_reference
{ nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.mem --format=csv
  python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
  python3 -c "import deep_gemm; print('deep_gemm', deep_gemm.__version__)" 2>&1 | tail -1; } > "$LOGS/gpu.txt" 2>&1
. bench/gpu/step.sh  # step NAME LIMIT CMD...
NGPU=$(nvidia-smi -L | wc -l)

[ -d .deepep ] && export PYTHONPATH=$PWD/.deepep:$PYTHONPATH
if has deepep && [ -f .deepep/build.sh ]; then  # in the background: it compiles on the CPUs
  (bash .deepep/build.sh > "$LOGS/deepep_build.log" 2>&1; echo "deepep build rc=$?" >> "$LOGS/deepep_build.log") &
  deepep_pid=$!
fi
TESTS=${TESTS:-"tests/gpu/test_fused_moe_fp8_gpu.py tests/gpu/test_fused_moe_fp8_hilo_gpu.py tests/gpu/test_deepgemm_fp8_gpu.py"}
# shellcheck disable=SC2086
run_tests() { step tests "${TEST_LIMIT:-240}" python3 -m pytest -q -p no:cacheprovider $TESTS; }
if [ "$NGPU" -ge 2 ] && has tests; then
  (export CUDA_VISIBLE_DEVICES=1; run_tests) &
  gpu1_pid=$!
  STAGES=${STAGES/tests/}
fi
export CUDA_VISIBLE_DEVICES=0
has tests && run_tests
if has tune; then
  for mode in ${TUNE_MODES:-w8a8}; do
    flag=""
    [[ $mode == *w8a16* ]] && flag="--w8a16"
    [[ $mode == *hilo* ]] && flag="$flag --hilo"
    [[ $mode == *tiles* ]] && flag="$flag --tiles"
    for E in ${TUNE_EXPERTS:-32}; do
      # shellcheck disable=SC2086
      step "tune_${mode}_compile_e$E" 100 python3 bench/tune_fused_moe_fp8.py --compile-only --jobs 12 \
        --experts "$E" $flag ${TUNE_FLAGS:-}
      # shellcheck disable=SC2086
      step "tune_${mode}_e$E" 150 python3 bench/tune_fused_moe_fp8.py --experts "$E" $flag ${TUNE_FLAGS:-} \
        --tokens ${TUNE_TOKENS:-64 256 1024 4096} --log "$RES/tune_${mode}_e$E.json"
    done
  done
  tar cf "$RES/tuned.tar" -C kernels tuned
fi
# shellcheck disable=SC2086
has ffn && step ffn 200 python3 bench/bench_expert_ffn.py --quick --cuda-graph \
  --variants ${FFN_VARIANTS:-triton,triton_fp8,triton_fp8_hilo,triton_w8a16,deepgemm,deepgemm_fp8,sglang} ${FFN_FLAGS:-} \
  --json "$RES/expert_ffn_fp8_h200.json"
has ffn_eager && step ffn_eager 200 python3 bench/bench_expert_ffn.py --quick \
  --variants triton,triton_fp8,deepgemm,deepgemm_fp8,sglang --json "$RES/expert_ffn_fp8_eager_h200.json"
has breakdown && step breakdown 150 python3 bench/gpu/fp8_breakdown.py --tokens 64 1024 4096 \
  --json "$RES/fp8_breakdown_h200.json"
[ -n "${gpu1_pid:-}" ] && wait "$gpu1_pid"
unset CUDA_VISIBLE_DEVICES
[ -n "${deepep_pid:-}" ] && { wait "$deepep_pid"; tail -3 "$LOGS/deepep_build.log" >> "$OUT/summary.txt"; }
if has ep && [ "$NGPU" -ge 2 ]; then
  # shellcheck disable=SC2086
  step ep_tests 180 python3 -m pytest -q -p no:cacheprovider ${EP_TESTS:-tests/gpu/test_nvlink_gpu.py}
  # shellcheck disable=SC2086
  [ "${DISPATCH:-1}" != 0 ] && step dispatch_fp8 150 python3 bench/bench_dispatch.py --world-size 2 --backend nccl --timeout 60 \
    ${DISPATCH_FLAGS:---cases headline --variants nvlink,nvlink_fp8} --json "$RES/dispatch_fp8_h200x2.json"
fi
tunes=$(cd "$LOGS" && ls tune_*_e*.log 2>/dev/null | grep -v _compile_ | sed 's/\.log$//')
for f in $tunes ffn ffn_eager breakdown dispatch_fp8; do [ -f "$LOGS/$f.log" ] && tail -n 30 "$LOGS/$f.log" >> "$OUT/summary.txt"; done
tar czf "$OUT/results.tgz" -C "$OUT" results logs && rm -rf "$RES" "$LOGS"
cat "$OUT/summary.txt"
