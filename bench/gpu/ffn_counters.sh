#!/usr/bin/env bash
# Hardware counters of the expert FFN's GEMM kernels (Nsight Compute, where the machine has it): DRAM bytes,
# L2 bytes, tensor-pipe activity and time per kernel of `triton` (the tuned tables), `bmm` (cuBLAS) and
# `deepgemm`, V3 dims, top-8, uniform routing, at the E x T of $CASES (default 128x4096 32x4096). The question:
# do the Triton GEMMs read each expert's weights from DRAM once (the floor: E x 3 x H x I x 2 bytes), and how
# busy are the tensor cores against cuBLAS's on the same rows?
#
#   bash bench/gpu/ffn_counters.sh      (device tool, nvidia-h200; carry .whl for deepgemm; $OUT gets
#                                         ncu_<case>.csv and summary.txt)
set -uo pipefail
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --target .site .whl/*.whl >/dev/null 2>&1
  export PYTHONPATH=$PWD/.site:$PWD
else
  export PYTHONPATH=$PWD
fi
. bench/gpu/names.sh
NCU=$(command -v ncu || ls /usr/local/cuda*/bin/ncu /opt/nvidia/nsight-compute/*/ncu 2>/dev/null | head -1)
if [ -z "$NCU" ]; then echo "no ncu on this machine" | tee "$OUT/summary.txt"; exit 0; fi
"$NCU" --version > "$OUT/summary.txt" 2>&1
cat > /tmp/ffn_ncu_case.py <<'PY'
import sys
import torch
from nanomoe_kernels import deepgemm
from nanomoe_kernels.fused_moe import fused_moe_aligned, stage_configs
from nanomoe_kernels.moe_align import moe_align
from nanomoe_kernels.moe_sum import sum_pairs
from nanomoe_reference.expert_rows import make_routing, make_weights
from bench.expert_ffn_variants import package_variant
E, T = (int(v) for v in sys.argv[1].split("x"))
K, H, I = 8, 7168, 2048
w = make_weights(E, H, I, "swiglu", torch.bfloat16, "cuda")
x = torch.randn(T, H, device="cuda", dtype=torch.bfloat16)
ids, tw = make_routing(T, E, K, "cuda")
first, down, bm = stage_configs(None, "swiglu", E, H, I, H, x.dtype, T * K, x.device)
al = moe_align(ids, E, bm)
row_w = tw.reshape(-1).contiguous()
fns = {"triton": lambda: sum_pairs(fused_moe_aligned(x, al, w, "swiglu", first, down, a_div=K, row_weights=row_w), K),
       "bmm": package_variant(x, ids, tw, w, "bmm")}
if deepgemm.supports(x, w)[0]:
    al_dg = moe_align(ids, E, deepgemm.alignment())
    fns["deepgemm"] = lambda: deepgemm.deepgemm_fused_moe(x, ids, tw, w, align=al_dg)
print("configs", first, down, flush=True)
for name, fn in fns.items():
    fn(); fn()
    torch.cuda.synchronize()
    torch.cuda.nvtx.range_push(name)
    torch.cuda.profiler.start()
    fn()
    torch.cuda.synchronize()
    torch.cuda.profiler.stop()
    torch.cuda.nvtx.range_pop()
PY
METRICS="gpu__time_duration.sum,dram__bytes_read.sum,dram__bytes_write.sum,lts__t_bytes.sum,\
sm__pipe_tensor_op_gmma_cycles_active.avg.pct_of_peak_sustained_active,sm__cycles_elapsed.avg.per_second,\
launch__grid_size,launch__registers_per_thread"
for CASE in ${CASES:-128x4096 32x4096}; do
  timeout 280 "$NCU" --profile-from-start off --metrics "$METRICS" --csv --print-units base \
    python3 /tmp/ffn_ncu_case.py "$CASE" > "$OUT/ncu_$CASE.csv" 2> "$OUT/ncu_$CASE.err"
  echo "== $CASE rc=$?" >> "$OUT/summary.txt"
  python3 - "$OUT/ncu_$CASE.csv" >> "$OUT/summary.txt" <<'PY'
import csv, collections, sys
rows = list(csv.reader(open(sys.argv[1])))
start = next((i for i, r in enumerate(rows) if r and r[0] == "ID"), None)
if start is None:
    print("no rows"); sys.exit()
head = rows[start]
body = [r for r in rows[start + 1:] if len(r) == len(head)]
ki, ni, vi, mi = head.index("ID"), head.index("Kernel Name"), head.index("Metric Value"), head.index("Metric Name")
per = collections.OrderedDict()
for r in body:
    per.setdefault((r[ki], r[ni][:60]), {})[r[mi]] = r[vi].replace(",", "")
for (k, n), m in per.items():
    us, rd = float(m["gpu__time_duration.sum"]) / 1e3, float(m["dram__bytes_read.sum"]) / 1e9
    if us > 50:
        print(f"{k:>3} {n:60s} {us:9.1f} us  DRAM read {rd:7.3f} GB  L2 {float(m['lts__t_bytes.sum']) / 1e9:7.2f} GB")
PY
done
cat "$OUT/summary.txt"
