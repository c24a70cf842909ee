#!/usr/bin/env bash
# 2-CTA clusters with TMA multicast for the expert GEMM (bench/gpu/ffn_cluster_probe.py), on a Triton carried from
# here (the GPU machine has 3.6, which has no multicast): run bench/gpu/pack_triton.sh first, then
#
#   [OWN=] bash bench/gpu/ffn_cluster.sh   (device tool, nvidia-h200, carry [".whl"]; $OUT gets ffn_cluster_probe.json
#                                      and probe.txt; then, unless OWN is empty, the same on the machine's Triton:
#                                      ffn_cluster_probe_own.json, probe_own.txt)
set -uo pipefail
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
tar=$(ls .whl/triton*_cp312.tar.xz | tail -1)
mkdir -p /tmp/site && python3 -c "import tarfile, sys; tarfile.open(sys.argv[1]).extractall('/tmp/site')" "$tar" || exit
export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH} TRITON_BACKENDS_IN_TREE=1   # the pack has no AMD backend
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, triton.__file__)"
timeout ${LIMIT:-300} python3 bench/gpu/ffn_cluster_probe.py --json "$OUT/ffn_cluster_probe.json" ${ARGS:-} \
  > "$OUT/probe.txt" 2>&1; echo "probe rc=$?"; tail -20 "$OUT/probe.txt"
# the machine's own Triton (3.6): the persistent and 1x1 programs only
if [ -n "${OWN-1}" ]; then
  PYTHONPATH=${PYTHONPATH#/tmp/site} timeout ${LIMIT:-300} python3 bench/gpu/ffn_cluster_probe.py \
    --json "$OUT/ffn_cluster_probe_own.json" ${ARGS:-} > "$OUT/probe_own.txt" 2>&1
  echo "own-triton probe rc=$?"; tail -20 "$OUT/probe_own.txt"
fi
