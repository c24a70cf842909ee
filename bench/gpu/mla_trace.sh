#!/usr/bin/env bash
# The 128-head few-row MLA decode's stage 1 from the inside: the kernel's own timeline (mla_trace_probe.py), the
# wgmma GPU tests, then Nsight Compute's sections for one default stage 1 at one 16k row (where ncu exists).
#
#   bash bench/gpu/mla_trace.sh        (device tool, nvidia-h200; $OUT gets mla_trace_probe.json, tests.txt, ncu.txt)
set -uo pipefail
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
. bench/gpu/names.sh
python3 bench/gpu/mla_trace_probe.py --out "$OUT/mla_trace_probe.json" --reps "${REPS:-30}" > "$OUT/probe.txt" 2>&1
echo "probe rc=$?"; tail -5 "$OUT/probe.txt"
python3 -m pytest -q -x tests/gpu/test_mla_wgmma_gpu.py > "$OUT/tests.txt" 2>&1; echo "tests rc=$?"; tail -3 "$OUT/tests.txt"
NCU=$(command -v ncu || ls /usr/local/cuda*/bin/ncu /opt/nvidia/nsight-compute/*/ncu 2>/dev/null | head -1)
[ -z "$NCU" ] && { echo "no ncu on this machine"; exit 0; }
cat > /tmp/mla_trace_ncu.py <<'PY'
import torch
from bench.gpu.mla_trace_probe import make_inputs, stage1
q, kv, lens, bt = make_inputs(128, 1, 16384, True)
for _ in range(3):
    stage1(q, kv, lens, bt)
torch.cuda.synchronize()
PY
timeout 240 "$NCU" --target-processes all -k regex:_mla_decode_partial_ws --launch-skip 2 --launch-count 1 \
  --clock-control none --cache-control all --section SpeedOfLight --section MemoryWorkloadAnalysis \
  --section WarpStateStats --section LaunchStats --section Occupancy python3 /tmp/mla_trace_ncu.py > "$OUT/ncu.txt" 2>&1
echo "ncu rc=$?"; grep -E "Duration|Throughput|Hit Rate|Stall|Warp Cycles|Registers|Shared Memory Config" "$OUT/ncu.txt" | head -40
