#!/usr/bin/env bash
# Incremental developer build into a folder of your choice, without reinstalling the package:
#   scripts/dev_build.sh /tmp/build_me            # CPU build with the current python's torch
#   PYTHON=/path/venv-cuda/bin/python scripts/dev_build.sh /tmp/build_cuda   # + CUDA sources
# then use it with:  GMOD_EXT_LIBRARY=/tmp/build_me/libgmod_ext.so python -m pytest python_tests
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
build=${1:?usage: dev_build.sh BUILD_DIR}
py=${PYTHON:-python}
prefix=$("$py" -c 'import torch; print(torch.utils.cmake_prefix_path)')
has_cuda=$("$py" -c 'import torch; print("ON" if torch.version.cuda else "OFF")')
bindir=$(dirname "$("$py" -c 'import sys; print(sys.executable)')")
cmake=$bindir/cmake; [ -x "$cmake" ] || cmake=cmake
ninja=$bindir/ninja; [ -x "$ninja" ] || ninja=ninja
"$cmake" -S "$root" -B "$build" -G Ninja -DCMAKE_MAKE_PROGRAM="$ninja" -DCMAKE_PREFIX_PATH="$prefix" \
  -DGMOD_TORCH_HAS_CUDA="$has_cuda" -DGMOD_FORCE_CPU="${GMOD_FORCE_CPU:-OFF}" \
  -DGMOD_SOURCE_FILTER="${GMOD_SOURCE_FILTER:-}" >/dev/null
"$cmake" --build "$build" -j "${MAX_JOBS:-2}"
echo "built $build/libgmod_ext.so"
