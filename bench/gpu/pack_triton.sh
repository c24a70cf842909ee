#!/usr/bin/env bash
# Run here (the development machine), in the project's root: packs a Triton newer than the GPU machine's 3.6 into
# .whl/triton<VER>_cp312.tar.xz (~48 MB for 3.8.0), small enough to carry (the wheel itself is ~250 MB, libtriton
# ~500 MB unstripped). Kept: the Python package, the stripped libtriton, the sm_90 ptxas, libdevice and headers.
# Dropped: proton / CUPTI, the Blackwell ptxas, cuobjdump, nvdisasm, the MLIR plugins.
#
#   bash bench/gpu/pack_triton.sh [VERSION]        (default 3.8.0)
# On the GPU machine, before the run (bench/gpu/ffn_cluster.sh does this):
#   mkdir -p /tmp/site && python3 -c "import tarfile; tarfile.open('.whl/triton3.8.0_cp312.tar.xz').extractall('/tmp/site')"
#   export PYTHONPATH=/tmp/site:$PYTHONPATH
set -euo pipefail
ver=${1:-3.8.0}
tmp=$(mktemp -d)
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 -d "$tmp" "triton==$ver"
(cd "$tmp" && unzip -q triton-*.whl 'triton/*')
t="$tmp/triton"
case $ver in 3.[0-8].*) other=ptxas-blackwell ;; *) other=ptxas ;; esac
rm -rf "$t"/backends/amd "$t"/backends/nvidia/lib/cupti* "$t"/instrumentation "$t"/_C/libproton.so "$t"/plugins \
  "$t"/backends/nvidia/bin/$other "$t"/backends/nvidia/bin/cuobjdump "$t"/backends/nvidia/bin/nvdisasm
strip --strip-unneeded "$t"/_C/libtriton.so
mkdir -p .whl
tar -C "$tmp" -cf - triton | xz -9 -T2 > ".whl/triton${ver}_cp312.tar.xz"
rm -rf "$tmp"
ls -la ".whl/triton${ver}_cp312.tar.xz"
