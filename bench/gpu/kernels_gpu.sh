#!/usr/bin/env bash
# Kernels at the floor (issue 13): GPU tests of the expert FFN, DeepGEMM glue and MLA decode, the tuner,
# and the benches (the peers run in the same process as ours, so each figure sits next to its peers
# measured in the same run).
#
#   STAGES="tests tune ffn mla" bash bench/gpu/kernels_gpu.sh       (device tool, nvidia-h200 or -x2;
#                                                                   carry .whl and .peers)
#   STAGES="ranking" bash bench/gpu/kernels_gpu.sh                   (the loop < bmm < triton grid)
#   STAGES="pdl tiles" bash bench/gpu/kernels_gpu.sh                 (probes: MLA's reduction with PDL,
#                                                                   the FFN's config variants)
#   STAGES="layout route" bash bench/gpu/kernels_gpu.sh              (probes: DeepGEMM's layouts; the route
#                                                                   kernel's launch shapes, the router GEMM)
#   STAGES="clock" bash bench/gpu/kernels_gpu.sh                     (probe: clocks under sustained load,
#                                                                   DeepGEMM's expected_m, its PDL)
#   STAGES="wgmma" bash bench/gpu/kernels_gpu.sh                     (probe: the Gluon wgmma MLA stage 1 against
#                                                                   the Triton kernels)
#   STAGES="ffn_wgmma" bash bench/gpu/kernels_gpu.sh                 (probe: the Gluon wgmma expert GEMM against
#                                                                   the tuned Triton configs and the peers)
#
#   STAGES="align host" bash bench/gpu/kernels_gpu.sh                (probes: moe_align's grids; the FFN call's
#                                                                   host time and kernels, HOST_FLAGS)
#
# Env: STAGES (any of: tests tune ffn ffn_graph mla ranking pdl tiles layout route clock wgmma ffn_wgmma align
# host), TOTAL
# (seconds, 560), TUNE_TOKENS
# (tuner sizes, "1024 4096"), TUNE_EXPERTS ("32"), FFN_FLAGS / MLA_FLAGS / RANKING_FLAGS / LAYOUT_FLAGS / WGMMA_FLAGS
# / FFN_WGMMA_FLAGS / TILES_FLAGS (extra flags), MLA_LIMIT / LAYOUT_LIMIT / TILES_LIMIT / TEST_LIMIT (those steps' seconds), TESTS (the test files), PYTEST_K (their
# -k). With two GPUs, GPU 1 runs the tests and then
# the ranking while GPU 0 tunes and times.
# $OUT gets results.tgz (results/: expert_ffn_h200.json, mla_h200.json, ranking_h200.json, tune_*.json,
# tuned.tar; logs/) and summary.txt.
set -uo pipefail
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
OUT=${OUT:-/tmp/out}; STAGES=${STAGES:-"tests tune ffn mla"}; TOTAL=${TOTAL:-560}
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
  python3 -c "import deep_gemm; print('deep_gemm', deep_gemm.__version__)" 2>&1 | tail -1
  ls .peers/sgl 2>&1; } > "$LOGS/gpu.txt" 2>&1
. bench/gpu/step.sh  # step NAME LIMIT CMD...

TESTS=${TESTS:-"tests/gpu/test_fused_moe_gpu.py tests/gpu/test_deepgemm_gpu.py tests/gpu/test_mla_gpu.py"}
# shellcheck disable=SC2086
run_tests() { step tests "${TEST_LIMIT:-200}" python3 -m pytest -q -p no:cacheprovider ${PYTEST_K:+-k "$PYTEST_K"} $TESTS; }
# shellcheck disable=SC2086
run_ranking() { step ranking "${RANKING_LIMIT:-420}" python3 bench/bench_expert_ffn.py --ranking ${RANKING_FLAGS:-} \
  --json "$RES/ranking_h200.json"; }
if [ "$(nvidia-smi -L | wc -l)" -ge 2 ]; then  # GPU 1: the tests, then the ranking grid, in the background
  (export CUDA_VISIBLE_DEVICES=1; if has tests; then run_tests; fi; if has ranking; then run_ranking; fi) &
  gpu1_pid=$!
  STAGES=${STAGES/tests/}; STAGES=${STAGES/ranking/}
fi
export CUDA_VISIBLE_DEVICES=0
has tests && run_tests
if has tune; then
  for E in ${TUNE_EXPERTS:-32}; do
    # shellcheck disable=SC2086
    step "tune_compile_e$E" 90 python3 bench/tune_fused_moe.py --compile-only --jobs 12 --experts "$E" \
      --tokens ${TUNE_TOKENS:-1024 4096}
    # shellcheck disable=SC2086
    step "tune_e$E" 150 python3 bench/tune_fused_moe.py --experts "$E" --tokens ${TUNE_TOKENS:-1024 4096} \
      --log "$RES/tune_e$E.json"
  done
  tar cf "$RES/tuned.tar" -C kernels tuned
fi
# shellcheck disable=SC2086
has ffn && step ffn 240 python3 bench/bench_expert_ffn.py --quick --seed-shape --rounds 3 \
  --variants triton,triton+align,deepgemm,deepgemm_glue,sglang,bmm,bmm_padded,loop ${FFN_FLAGS:-} --json "$RES/expert_ffn_h200.json"
has ffn_graph && step ffn_graph 150 python3 bench/bench_expert_ffn.py --quick --cuda-graph \
  --variants triton,deepgemm,sglang --json "$RES/expert_ffn_graph_h200.json"
# shellcheck disable=SC2086
has mla && step mla "${MLA_LIMIT:-150}" python3 bench/bench_mla.py --small-batch ${MLA_FLAGS:-} --json "$RES/mla_h200.json"
# shellcheck disable=SC2086
has layout && step layout "${LAYOUT_LIMIT:-200}" python3 bench/gpu/ffn_layout_probe.py --bmm-cases "" \
  ${LAYOUT_FLAGS:---cases 32x256,32x1024,32x4096,64x1024,128x1024} --json "$RES/ffn_layout_probe.json"
# shellcheck disable=SC2086
has route && step route "${ROUTE_LIMIT:-150}" python3 bench/gpu/route_probe.py --sweep --gemm --tokens ${ROUTE_TOKENS:-32 128 4096} --iters 20 \
  --json "$RES/route_probe.json"
# shellcheck disable=SC2086
has clock && DG_PRINT_CONFIGS=1 step clock "${CLOCK_LIMIT:-300}" python3 bench/gpu/ffn_clock_probe.py ${CLOCK_FLAGS:-} \
  --json "$RES/ffn_clock_probe.json"
# shellcheck disable=SC2086
has wgmma && step wgmma "${WGMMA_LIMIT:-200}" python3 bench/gpu/mla_small_probe.py ${WGMMA_FLAGS:---wgmma} --rounds 5 \
  --out "$RES/mla_wgmma_probe.json"
has pdl && step pdl 150 python3 bench/gpu/mla_small_probe.py --pdl --rounds 5 --out "$RES/mla_pdl_probe.json"
has ffn_wgmma && step ffn_wgmma "${FFN_WGMMA_LIMIT:-300}" python3 bench/gpu/ffn_wgmma_probe.py ${FFN_WGMMA_FLAGS:-} \
  --json "$RES/ffn_wgmma_probe.json"
has align && step align "${ALIGN_LIMIT:-150}" python3 bench/gpu/align_probe.py --json "$RES/align_probe.json"
# shellcheck disable=SC2086
has host && step host "${HOST_LIMIT:-200}" python3 bench/gpu/ffn_host_probe.py ${HOST_FLAGS:-} --json "$RES/ffn_host_probe.json"
has tiles && step tiles "${TILES_LIMIT:-240}" python3 bench/gpu/ffn_config_probe.py --rounds 5 ${TILES_FLAGS:-} --json "$RES/ffn_tiles_probe.json"
has ranking && run_ranking
[ -n "${gpu1_pid:-}" ] && wait "$gpu1_pid"
for f in ffn ffn_graph mla ranking pdl tiles layout route clock wgmma ffn_wgmma align host; do [ -f "$LOGS/$f.log" ] && tail -n 40 "$LOGS/$f.log" >> "$OUT/summary.txt"; done
# one archive: the device tool returns a limited number of files
tar czf "$OUT/results.tgz" -C "$OUT" results logs && rm -rf "$RES" "$LOGS"
cat "$OUT/summary.txt"
