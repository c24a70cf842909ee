#!/usr/bin/env bash
# Issue 10 on the 2-GPU machine in one go: the EP GPU tests, the dispatch/combine bench (every comm,
# DeepEP measured in the same run), the EP layer bench per comm (seed shape, README sizes, DeepSeek-V3
# dims), and the EPLB part when bench/gpu/eplb_gpu_part.sh exists. Carry .deepep (DeepEP v1.2.1 source,
# ../shared/device/prepare-deepep.sh; built here in the background) and .whl (DeepGEMM) when present.
#
#   bash bench/gpu/ep_gpu.sh                               # everything the budget allows
#   STAGES="tests dispatch" bash bench/gpu/ep_gpu.sh       # a first call ...
#   STAGES="layer eplb" bash bench/gpu/ep_gpu.sh           # ... and a second one (each call <= 10 min)
#
# Env: STAGES (any of: tests profile dispatch layer eplb), TESTS (tests/gpu/ file stems to run), PYTEST_K (their
# -k), PROFILES, DISPATCH_REPEAT (runs of the headline dispatch bench, default 1), LAYER_EAGER=1 (no --cuda-graph),
# DISPATCH_FLAGS (extra bench_dispatch flags, e.g. --barrier dist),
# HOST_COSTS_FLAGS (extra flags of host_costs.py),
# DISPATCH_VARIANTS (bench_dispatch --variants for the headline case; default: all), DISPATCH_TABLE=0 (skip
# the public-table cases), LAYER_COMMS and PREFILL_COMMS (the comms of the layer stage; - for none), TOTAL (seconds the script may take, default 560),
# OUT (default /tmp/out), WORK (where results/ and logs/ accumulate, default /tmp/ep_gpu), ITERS.
# $OUT gets only results.tgz (results/<bench>_<case>_h200x2.json), logs.tgz and summary.txt.
set -uo pipefail
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
OUT=${OUT:-/tmp/out}; WORK=${WORK:-/tmp/ep_gpu}; STAGES=${STAGES:-"tests dispatch layer eplb"}
TOTAL=${TOTAL:-560}; ITERS=${ITERS:-50}; TAG=h200x2
RES=$WORK/results; LOGS=$WORK/logs; STATUS=$WORK/status.txt
mkdir -p "$OUT" "$RES" "$LOGS"; : > "$STATUS"
export PYTHONPATH=$PWD
has() { [[ " $STAGES " == *" $1 "* ]]; }

if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site:$PYTHONPATH
fi
DEEPEP_PID=""
. bench/gpu/names.sh  # nanomoe_kernels / nanomoe_reference
if [ -d .deepep ]; then
  export PYTHONPATH=$PWD/.deepep:$PYTHONPATH
  if [ -f .deepep/build.sh ]; then
    bash .deepep/build.sh > "$LOGS/deepep_build.log" 2>&1 &
    DEEPEP_PID=$!
  fi
fi

# run_step NAME LIMIT_S CMD...: bounded by `timeout` (whole process group) and by what is left of TOTAL
run_step() {
  local name=$1 limit=$2; shift 2
  local left=$(( TOTAL - SECONDS - 20 ))
  if (( left < 30 )); then
    echo "SKIP   $name (budget: ${left}s left)" | tee -a "$STATUS"; return 0
  fi
  (( limit > left )) && limit=$left
  local t0=$SECONDS
  echo ">>> $name (limit ${limit}s): $*"
  timeout -k 10 "$limit" "$@" > "$LOGS/$name.log" 2>&1
  local rc=$?
  local verdict="ok"; (( rc == 124 || rc == 137 )) && verdict="TIMEOUT"; (( rc != 0 && rc != 124 && rc != 137 )) && verdict="FAIL"
  printf '%-7s %-40s rc=%-3s %4ss  %s\n' "$verdict" "$name" "$rc" "$(( SECONDS - t0 ))" \
    "$(grep -E 'passed|failed|error|skipped|FAILED|Error' "$LOGS/$name.log" | tail -1 | cut -c1-150)" | tee -a "$STATUS"
}

wait_deepep() {  # the DeepEP build, bounded by the budget
  [ -n "$DEEPEP_PID" ] || return 0
  while kill -0 "$DEEPEP_PID" 2>/dev/null && (( SECONDS < TOTAL - 120 )); do sleep 2; done
  if kill -0 "$DEEPEP_PID" 2>/dev/null; then echo "DeepEP build still running: not waiting" | tee -a "$STATUS"; return 0; fi
  wait "$DEEPEP_PID"; local rc=$?
  echo "DeepEP build rc=$rc: $(tail -2 "$LOGS/deepep_build.log" | tr '\n' ' ')" | tee -a "$STATUS"
  DEEPEP_PID=""
}

{
  echo "== $(date -u +%FT%TZ) stages: $STAGES, budget ${TOTAL}s"
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  nvidia-smi topo -m
  python3 - <<'EOF'
import importlib.util, torch
v = {"torch": torch.__version__, "cuda": torch.version.cuda, "gpus": torch.cuda.device_count()}
try:
    v["nccl"] = ".".join(map(str, torch.cuda.nccl.version()))
except Exception as err:
    v["nccl"] = f"unavailable ({type(err).__name__})"
for m in ("triton", "deep_gemm"):
    if importlib.util.find_spec(m):
        v[m] = getattr(__import__(m), "__version__", "?")
try:
    from importlib.metadata import version
    v["nvshmem"] = version("nvidia-nvshmem-cu13")
except Exception:
    pass
print(v)
EOF
} 2>&1 | tee "$LOGS/env.log"

if has tests; then
  for t in ${TESTS:-test_torch_comm_gpu test_nvlink_gpu test_deepep_gpu test_layer_gpu}; do
    [ "$t" = test_deepep_gpu ] && wait_deepep
    if [ -f "tests/gpu/$t.py" ]; then
      run_step "$t" 240 python3 -m pytest -q -p no:cacheprovider -W ignore::UserWarning -rfEs ${PYTEST_K:+-k "$PYTEST_K"} \
        "tests/gpu/$t.py"
    else
      echo "SKIP   $t (tests/gpu/$t.py not in this tree)" | tee -a "$STATUS"
    fi
  done
fi

if has profile; then  # where the time goes: host cost per step, nvlink per kernel, the torch comm's host side
  for p in ${PROFILES:-host_costs nvlink_profile torch_comm_profile}; do
    case $p in
      host_costs) run_step host_costs 150 python3 bench/gpu/host_costs.py ${HOST_COSTS_FLAGS:-} --json "$RES/host_costs_$TAG.json" ;;
      nvlink_profile) run_step nvlink_profile 120 python3 bench/gpu/nvlink_profile.py --tokens 128 4096 \
                        --json "$RES/nvlink_profile_$TAG.json" ;;
      torch_comm_profile) run_step torch_comm_profile 150 python3 bench/gpu/torch_comm_profile.py --out "$RES" ;;
    esac
  done
fi

if has dispatch; then
  [[ -z "${DISPATCH_VARIANTS:-}" || "${DISPATCH_VARIANTS}" == *deepep* ]] && wait_deepep
  D="python3 bench/bench_dispatch.py --world-size 2 --backend nccl --iters $ITERS --timeout 60 ${DISPATCH_FLAGS:-}"
  run_step dispatch_headline 240 $D --cases headline ${DISPATCH_VARIANTS:+--variants $DISPATCH_VARIANTS} \
    --json "$RES/dispatch_headline_$TAG.json"
  for r in $(seq 2 "${DISPATCH_REPEAT:-1}"); do  # the per-call rows move between runs: repeats in the same run
    run_step "dispatch_headline_r$r" 240 $D --cases headline ${DISPATCH_VARIANTS:+--variants $DISPATCH_VARIANTS} \
      --json "$RES/dispatch_headline_r${r}_$TAG.json"
  done
  if [ -n "${DISPATCH_VARIANTS:-}" ]; then
    echo "SKIP   dispatch_headline_peers, dispatch_table (DISPATCH_VARIANTS given: headline only)" | tee -a "$STATUS"
  elif python3 -c "import deep_ep" 2>/dev/null; then
    run_step dispatch_headline_peers 150 $D --cases headline --variants deepep_raw,deepep_ll_raw,nccl_a2a \
      --json "$RES/dispatch_headline_peers_$TAG.json"
  else
    echo "SKIP   dispatch_headline_peers (deep_ep does not import)" | tee -a "$STATUS"
  fi
  [ -z "${DISPATCH_VARIANTS:-}" ] && [ "${DISPATCH_TABLE:-1}" != 0 ] && run_step dispatch_table 240 $D --cases table --json "$RES/dispatch_table_$TAG.json"
fi

if has layer; then
  wait_deepep
  L="python3 bench/bench_ep_moe_multi.py --world-size 2 --backend nccl --dtype bfloat16 --timeout 60"
  graph_flag() { [ "${LAYER_EAGER:-0}" = 1 ] && return; case $1 in torch_decode|torch_fixed|nvlink|deepep_ll) echo --cuda-graph ;; esac; }
  for c in ${LAYER_COMMS:-torch torch_fixed nvlink deepep deepep_ll}; do  # seed default shape: 256 linear experts, H 2048, 128 tok
    [ "$c" = - ] && continue  # LAYER_COMMS=- : none
    run_step "ep_moe_multi_seed_$c" 120 $L --expert-type linear --mode triton --comm $c $(graph_flag $c) \
      --json "$RES/ep_moe_multi_seed_${c}_$TAG.json"
  done
  for c in ${LAYER_COMMS:-torch torch_fixed nvlink deepep deepep_ll}; do  # the README's small sizes
    [ "$c" = - ] && continue
    run_step "ep_moe_multi_small_$c" 90 $L --expert-type linear --mode triton --batch-size 8 --hidden-dim 256 \
      --comm $c $(graph_flag $c) --json "$RES/ep_moe_multi_small_${c}_$TAG.json"
  done
  V3="--expert-type swiglu --hidden-dim 7168 --intermediate-dim 2048 --num-experts 256 --mode triton"
  for c in ${LAYER_COMMS:-torch torch_fixed nvlink deepep deepep_ll}; do  # DeepSeek-V3 dims, 128 local experts per rank
    [ "$c" = - ] && continue
    run_step "ep_moe_multi_v3_t128_$c" 150 $L $V3 --batch-size 128 --comm $c $(graph_flag $c) \
      --json "$RES/ep_moe_multi_v3_t128_${c}_$TAG.json"
  done
  for c in ${PREFILL_COMMS:-torch nvlink deepep}; do  # prefill: the decode-only comms (torch_fixed, deepep_ll) are left out
    [ "$c" = - ] && continue
    run_step "ep_moe_multi_v3_t4096_$c" 180 $L $V3 --batch-size 4096 --comm $c \
      --json "$RES/ep_moe_multi_v3_t4096_${c}_$TAG.json"
  done
fi

if has eplb; then
  if [ -f bench/gpu/eplb_gpu_part.sh ]; then
    left=$(( TOTAL - SECONDS - 20 ))
    if (( left > 60 )); then
      # its JSON goes to $OUT/results/ there, i.e. next to ours
      run_step eplb_gpu_part "$left" env OUT="$WORK" TAG="$TAG" bash bench/gpu/eplb_gpu_part.sh
    else
      echo "SKIP   eplb_gpu_part (budget)" | tee -a "$STATUS"
    fi
  else
    echo "SKIP   eplb (bench/gpu/eplb_gpu_part.sh not in this tree)" | tee -a "$STATUS"
  fi
fi
[ -n "$DEEPEP_PID" ] && echo "note: the DeepEP build is still running (see logs/deepep_build.log)"

tar czf "$OUT/results.tgz" -C "$WORK" results
tar czf "$OUT/logs.tgz" -C "$WORK" logs status.txt
{
  echo "== steps"; cat "$STATUS"
  echo "== failures (last lines of failing logs)"
  grep -lE "^(FAIL|TIMEOUT)" "$STATUS" >/dev/null && awk '$1=="FAIL"||$1=="TIMEOUT"{print $2}' "$STATUS" | while read -r n; do
    echo "-- $n"; grep -vE "Warning|warn\(" "$LOGS/$n.log" | tail -8 | cut -c1-300; done
  echo "== results"
  python3 - "$RES" <<'EOF'
import glob, json, os, sys
for path in sorted(glob.glob(os.path.join(sys.argv[1], "*.json"))):
    rec = json.load(open(path))
    print(f"-- {os.path.basename(path)}")
    for r in rec.get("rows", []):
        c = r["case"]
        if rec.get("bench") == "dispatch":
            g = f" graph {r['graph_dispatch_us']}/{r['graph_combine_us']} round {r['graph_round_us']}" \
                if "graph_round_us" in r else (f" graph_error={r['graph_error'][:60]}" if "graph_error" in r else "")
            g += f" b2b {r['b2b_dispatch_us']}/{r.get('b2b_combine_us', 0)} ({r['b2b_gbps']} GB/s)" if "b2b_gbps" in r else ""
            print(f"  {c['phase']:7s} T={c['tokens']:5d} H={c['hidden']:5d} E={c['experts']:3d} {r['variant']:13s} "
                  f"d {r['dispatch_us']:8.1f} c {r.get('combine_us', 0):8.1f} us {r['gbps']:7.1f} GB/s{g}")
        else:
            print(f"  T={c.get('tokens', '?')} H={c.get('hidden', '?')} E={c.get('experts', '?')} "
                  f"{c.get('comm', '')} {r.get('variant', '')} graph={c.get('cuda_graph', False)} "
                  f"{r.get('median_us', float('nan')):.1f} us" + (f" speedup {r['speedup_vs']}" if "speedup_vs" in r else "")
                  + (f" graph_error={r['graph_error'][:60]}" if "graph_error" in r else ""))
    for key in ("skipped", "failed"):
        for s in rec.get(key, []):
            c = s.get("case", {})
            print(f"  {key.upper()} {c.get('phase', '')} T={c.get('tokens', '')} {s.get('variant', s.get('comm'))}: "
                  f"{(s.get('reason') or s.get('error') or '')[:110]}")
EOF
} 2>&1 | tee "$OUT/summary.txt"
echo "== done in ${SECONDS}s; $OUT: $(ls "$OUT" | tr '\n' ' ')"
