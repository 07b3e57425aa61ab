#!/usr/bin/env bash
# Runs `lmspec doctor`, the MLX binding test and the golden cases on an
# NVIDIA GPU machine with the CUDA build of MLX. See docs/gpu.md for how the
# inputs are prepared: the parts of a tar.xz of the mlx-cuda-13 wheel's
# libraries and a tar.xz of its headers (MLX compiles CUDA kernels at run time
# and looks for them beside libmlx.so) in $LMSPEC_PARTS (default
# /tmp/lmspec-parts) and the binaries,
# built on the CPU machine, in $LMSPEC_BIN (default .gpu/b/bin). With the mlx
# and mlx-lm wheels in $LMSPEC_WHEELS it also runs gpu_mlx_checks.py.
set -euo pipefail
root="$(pwd)"
bin="${LMSPEC_BIN:-.gpu/b/bin}"
[ -x "$bin/lmspec" ] || { echo "gpu-doctor: no $bin/lmspec; build it on the CPU machine (docs/gpu.md, step 1) and bring .gpu/ along (git-ignored)" >&2; exit 1; }
source .ci/gpu-env.sh
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
echo "== lmspec doctor"
"$bin"/lmspec doctor
echo "== MLX binding test (engine unit tests)"
"$bin"/engine-tests --test-threads=1
echo "== golden cases on the GPU"
"$bin"/lmspec golden || true
echo "== golden cases on the GPU, fused projections"
LMSPEC_FUSE_PROJECTIONS=1 "$bin"/lmspec golden || true
# With the mlx wheels (gpu-bench.sh's), the single-operation checks.
if mlx_python; then
  echo "== single MLX operations, GPU against CPU"
  MLX_ENABLE_TF32=0 python3 porting-tools/python/gpu_mlx_checks.py || true
fi
