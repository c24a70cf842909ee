# EPLB part of issue 10 on the 2-GPU machine (2 H200s), from the repository root. bench/gpu/ep_gpu.sh runs it
# as `env OUT="$WORK" TAG=h200x2 bash bench/gpu/eplb_gpu_part.sh`; it also works alone (`bash ...`) or
# sourced (it sets no shell options and never calls exit). About 2 minutes:
#   1. bench/bench_eplb_layer.py at DeepSeek-V3 dims (hidden 7168, intermediate 2048, 256 experts, top-8,
#      bf16, 32 redundant slots, 4096 and 128 tokens/rank), Zipf 1.0 and one hot expert: the layer with the
#      identity placement and with EPLB (static and dynamic remap), and the NCCL weight move; self-checking
#      (output unchanged across the rebalance, float64 reference, moved weights bit-exact). JSON in
#      $OUT/results/eplb_layer_$TAG.json (one file per comm in EPLB_COMMS, default "torch"; e.g.
#      EPLB_COMMS="torch nvlink" once that comm is in the tree);
#   2. tests/gpu/test_eplb_gpu.py: 2 NCCL ranks serve a skewed layer, record, rebalance, move the expert
#      weights over NCCL (serving between rounds), serve again, bf16 and float32 (its own 200 s bound inside).
# Logs: $OUT/logs/eplb_*.log; one status line per step in $OUT/logs/eplb_status.txt. The last command's
# status is 0 only when every step passed.
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}
TAG=${TAG:-h200x2}
mkdir -p "$OUT/results" "$OUT/logs"
eplb_failed=0

for comm in ${EPLB_COMMS:-torch}; do
  name=eplb_layer_$TAG; [ "$comm" = torch ] || name=eplb_layer_${comm}_$TAG
  timeout -k 10 180 python3 bench/bench_eplb_layer.py --world-size 2 --backend nccl --comm "$comm" \
    --hidden-dim 7168 --intermediate-dim 2048 --num-experts 256 --top-k 8 --tokens 4096,128 --redundant 32 \
    --skews zipf1.0,hot1 --warmup 3 --iters 10 --move-reps 3 --json "$OUT/results/$name.json" \
    > "$OUT/logs/$name.log" 2>&1
  rc=$?; [ $rc = 0 ] || eplb_failed=1
  echo "eplb bench --comm $comm: rc=$rc (log $OUT/logs/$name.log)" | tee -a "$OUT/logs/eplb_status.txt"
  grep -v -i warn "$OUT/logs/$name.log" | tail -18
done

timeout -k 10 240 python3 -m pytest -q -x -s -p no:cacheprovider -W ignore::UserWarning -rfEs \
  tests/gpu/test_eplb_gpu.py > "$OUT/logs/eplb_gpu_test.log" 2>&1
rc=$?; [ $rc = 0 ] || eplb_failed=1
echo "eplb gpu test: rc=$rc (log $OUT/logs/eplb_gpu_test.log)" | tee -a "$OUT/logs/eplb_status.txt"
tail -8 "$OUT/logs/eplb_gpu_test.log"
[ $eplb_failed = 0 ]
