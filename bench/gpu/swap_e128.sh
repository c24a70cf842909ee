#!/usr/bin/env bash
# One GPU: SWAP (kernels/fused_moe_swap.py, rows copied into aligned order first) at 128 experts, where the grouped
# wgmma entry ties `bmm` (run 273: 7 of 15 rounds). Since run 265 found SWAP 5% slower there, moe_align's offsets
# and the swap block list run on grids (~110 us less per call at 128 x 4096).
#   1. swap_ffn_probe.py: the tables against swap_perm at 128 x 4096 and 128 x 16384, interleaved rounds;
#   2. the E = 128 tables' M = 32768 entries set to swap_perm's configs (in this working copy only), then the
#      ranking's bmm and triton at the same sizes, 15 interleaved rounds.
#   bash bench/gpu/swap_e128.sh      (device tool, nvidia-h200; $OUT gets the two JSON files and the logs)
set -uo pipefail
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
. bench/gpu/names.sh
timeout -k 10 "${PROBE_LIMIT:-240}" python3 bench/gpu/swap_ffn_probe.py --rounds "${ROUNDS:-10}" --kernels \
  --cases 128x4096,128x16384 --variants tables,swap_perm --json "$OUT/swap_e128_probe.json" > "$OUT/probe.log" 2>&1
echo "probe rc=$?"; tail -n 25 "$OUT/probe.log"
python3 - <<'PY'
import json, pathlib
up = dict(BLOCK_M=16, BLOCK_N=64, BLOCK_K=64, GROUP_M=8, num_warps=4, num_stages=4, SWAP=True, PERMUTE_A=True)
down = {**up, "BLOCK_N": 128, "PERMUTE_A": False}
for op, cfg, n, k in (("up", up, 2048, 7168), ("down", down, 7168, 2048)):
    p = pathlib.Path(f"kernels/tuned/E=128,N={n},K={k},op={op},dtype=bfloat16,device=NVIDIA_H200.json")
    t = json.loads(p.read_text()); t["32768"] = cfg; p.write_text(json.dumps(t, indent=1))
    print("patched", p.name)
PY
timeout -k 10 "${RANKING_LIMIT:-240}" python3 bench/bench_expert_ffn.py --ranking --experts 128 --tokens 4096 16384 \
  --variants bmm,triton --rounds "${RANK_ROUNDS:-15}" --json "$OUT/ranking_swap_e128.json" > "$OUT/ranking.log" 2>&1
echo "ranking rc=$?"; tail -n 12 "$OUT/ranking.log"
