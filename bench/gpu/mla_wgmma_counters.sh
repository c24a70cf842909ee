#!/usr/bin/env bash
# Hardware counters of the MLA decode stage-1 kernels (Nsight Compute, where the machine has it): the Gluon wgmma
# kernel and the Triton tl.dot kernel on 128 heads, B = 32, 16k contiguous (the compute-bound shape) and B = 1.
#
#   bash bench/gpu/mla_wgmma_counters.sh        (device tool, nvidia-h200; $OUT gets ncu_*.txt and summary.txt;
#                                                SOURCE_ONLY=1: only the per-instruction stall table)
set -uo pipefail
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
export PYTHONPATH=$PWD
. bench/gpu/names.sh
NCU=$(command -v ncu || ls /usr/local/cuda*/bin/ncu /opt/nvidia/nsight-compute/*/ncu 2>/dev/null | head -1)
if [ -z "$NCU" ]; then echo "no ncu on this machine" | tee "$OUT/summary.txt"; exit 0; fi
"$NCU" --version > "$OUT/summary.txt" 2>&1
cat > /tmp/mla_ncu_case.py <<'PY'
import sys
import torch
from nanomoe_kernels.mla_decode import DecodeTuning, default_tuning, mla_decode
rows = int(sys.argv[1])
g = torch.Generator(device="cuda").manual_seed(0)
kv = torch.randn(rows, 16384, 576, device="cuda", generator=g).bfloat16()
q = torch.randn(rows, 128, 576, device="cuda", generator=g).bfloat16()
lens = torch.full((rows,), 16384, dtype=torch.int32, device="cuda")
for t in (DecodeTuning(wgmma=True), default_tuning(128, rows)):
    for _ in range(2):
        mla_decode(q, kv, lens, 512, 0.1352, tuning=t)
torch.cuda.synchronize()
PY
METRICS="sm__pipe_tensor_op_gmma_cycles_active.avg.pct_of_peak_sustained_active,sm__cycles_elapsed.avg.per_second,\
l1tex__data_pipe_lsu_wavefronts_mem_shared.sum,smsp__inst_executed.sum,smsp__average_warps_issue_stalled_barrier_per_issue_active.ratio,smsp__average_warps_issue_stalled_long_scoreboard_per_issue_active.ratio,smsp__average_warps_issue_stalled_short_scoreboard_per_issue_active.ratio,smsp__average_warps_issue_stalled_wait_per_issue_active.ratio,smsp__average_warps_issue_stalled_math_pipe_throttle_per_issue_active.ratio,smsp__average_warps_issue_stalled_mio_throttle_per_issue_active.ratio,smsp__average_warps_issue_stalled_dispatch_stall_per_issue_active.ratio,smsp__average_warps_issue_stalled_membar_per_issue_active.ratio,smsp__average_warps_issue_stalled_sleeping_per_issue_active.ratio,smsp__average_warps_issue_stalled_lg_throttle_per_issue_active.ratio,smsp__average_warps_issue_stalled_selected_per_issue_active.ratio,smsp__average_warps_issue_stalled_not_selected_per_issue_active.ratio,smsp__average_warps_issue_stalled_no_instruction_per_issue_active.ratio,smsp__average_warps_issue_stalled_drain_per_issue_active.ratio,smsp__average_warps_issue_stalled_branch_resolving_per_issue_active.ratio,smsp__average_warps_issue_stalled_misc_per_issue_active.ratio"
for rows in ${SOURCE_ONLY:+none} 32 1; do
  [ "$rows" = none ] && break
  timeout 240 "$NCU" --target-processes all -k regex:_mla_decode_partial --launch-skip 1 --launch-count 3 \
    --section SpeedOfLight --section WarpStateStats --section ComputeWorkloadAnalysis --section MemoryWorkloadAnalysis \
    --section Occupancy --section LaunchStats --section InstructionStats --metrics "$METRICS" \
    python3 /tmp/mla_ncu_case.py "$rows" > "$OUT/ncu_rows$rows.txt" 2>&1
  echo "rows=$rows rc=$?" >> "$OUT/summary.txt"
done
grep -E "gmma|stalled|per_second|wavefronts|inst_executed|Duration|Compute \(SM\) Throughput|Memory Throughput|Stall|Issue Slot|Executed Ipc|L1/TEX Hit|L2 Hit|DRAM Throughput|Registers|Shared Memory" "$OUT"/ncu_rows*.txt | head -120 >> "$OUT/summary.txt"
cat "$OUT/summary.txt"
# Where the wgmma kernel's warps stall, per SASS instruction (B = 32): the 40 instructions with the most stall
# samples, with the reason columns, from ncu's source page.
timeout 200 "$NCU" --target-processes all -k regex:_mla_decode_partial_wgmma --launch-skip 1 --launch-count 1 \
  --section SourceCounters --section WarpStateStats -f -o "$OUT/wgmma32" python3 /tmp/mla_ncu_case.py 32 \
  > "$OUT/ncu_source_run.txt" 2>&1
"$NCU" --import "$OUT/wgmma32.ncu-rep" --page source --print-source sass --csv > "$OUT/wgmma32_sass.csv" 2>&1
python3 - "$OUT/wgmma32_sass.csv" > "$OUT/wgmma32_top_stalls.txt" 2>&1 <<'PY'
import csv, sys
rows = list(csv.reader(open(sys.argv[1])))
head = next(i for i, r in enumerate(rows) if any("Source" == c or "Address" in c for c in r))
cols, data = rows[head], rows[head + 1:]
print(cols)
key = next(c for c in cols if "Warp Stall Sampling (All" in c)
ki, si = cols.index(key), next(i for i, c in enumerate(cols) if c == "Source")
num = lambda v: float(v.replace(",", "") or 0) if v.replace(",", "").replace(".", "").isdigit() else 0.0
total = sum(num(r[ki]) for r in data if len(r) > ki)
print("total samples", total)
for r in sorted((r for r in data if len(r) > ki), key=lambda r: -num(r[ki]))[:40]:
    print(f"{num(r[ki]) / total:6.3f}  {r[si][:90]}  |  " + " ".join(f"{c[:18]}={r[i]}" for i, c in enumerate(cols)
          if "stall" in c.lower() and r[i] not in ("0", "")) [:400])
PY
head -60 "$OUT/wgmma32_top_stalls.txt"
