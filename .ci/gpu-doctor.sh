#!/usr/bin/env bash
# Runs `lmspec doctor`, the MLX binding test and the golden cases on an
# NVIDIA GPU machine with the CUDA build of MLX. See docs/gpu.md for how the
# inputs are prepared: the parts of a tar.xz of the mlx-cuda-13 wheel's
# libraries and a tar.xz of its headers (MLX compiles CUDA kernels at run time
# and looks for them beside libmlx.so) in $LMSPEC_PARTS (default
# /tmp/lmspec-parts) and the binaries,
# built on the CPU machine, in $LMSPEC_BIN (default .gpu/b/bin).
set -euo pipefail
root="$(pwd)"
bin="${LMSPEC_BIN:-.gpu/b/bin}"
lib=/tmp/lmspec-mlx-cuda
parts="${LMSPEC_PARTS:-/tmp/lmspec-parts}"
mkdir -p "$lib"
if [ ! -f "$lib/mlx/lib/libmlx.so" ]; then
  cat "$parts"/mlxcuda.tar.xz.part* | xz -d | tar x -C "$lib"
fi
if [ ! -d "$lib/mlx/include" ]; then
  xz -d < "$parts"/mlxcuda-include.tar.xz | tar x -C "$lib"
fi
site="$(python3 -c 'import site; print(site.getsitepackages()[0])')"
nvidia="$(ls -d "$site"/nvidia/*/lib | tr '\n' ':')"
export LD_LIBRARY_PATH="$lib/mlx/lib:$lib/mlx_cuda_13.libs:$nvidia${LD_LIBRARY_PATH:-}"
# The test binaries look for specs/ and goldens/ where they were built.
built_at="${LMSPEC_BUILT_AT:-/work/main}"
if [ "$root" != "$built_at" ] && [ ! -e "$built_at" ]; then
  mkdir -p "$(dirname "$built_at")"
  ln -s "$root" "$built_at"
fi
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
echo "== lmspec doctor"
"$bin"/lmspec doctor
echo "== MLX binding test (engine unit tests)"
"$bin"/engine-tests --test-threads=1
echo "== golden cases on the GPU"
"$bin"/lmspec golden || true
