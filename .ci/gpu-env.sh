# Sourced by the GPU helpers: unpacks the CUDA build of MLX (see
# docs/gpu.md) and points the loader at it and at the CUDA 13 libraries of
# the machine's Python. Inputs in $LMSPEC_PARTS (default /tmp/lmspec-parts):
# mlxcuda.tar.xz.part* (libmlx and its BLAS/LAPACK) and mlxcuda-include.tar.xz
# (the headers MLX compiles its CUDA kernels with at run time).
root="$(pwd)"
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
# The binaries look for specs/ and goldens/ where they were built.
built_at="${LMSPEC_BUILT_AT:-/work/main}"
if [ "$root" != "$built_at" ] && [ ! -e "$built_at" ]; then
  mkdir -p "$(dirname "$built_at")"
  ln -s "$root" "$built_at"
fi
# mlx (cp312) and mlx-lm for Python over the same libmlx, from the wheels in
# $LMSPEC_WHEELS (default /tmp/lmspec-wheels): `mlx_python` installs them
# once into /tmp/lmspec-site and exports PYTHONPATH; it fails without them.
mlx_python() {
  local wheels="${LMSPEC_WHEELS:-/tmp/lmspec-wheels}" py=/tmp/lmspec-site
  if [ ! -d "$py/mlx_lm" ]; then
    ls "$wheels"/*.whl >/dev/null 2>&1 || return 1
    python3 -m pip install -q --no-index --no-deps --no-compile --target "$py" "$wheels"/*.whl || return 1
    mkdir -p "$py/mlx/lib"
    cp "$lib/mlx/lib/libmlx.so" "$py/mlx/lib/"
    cp -r "$lib/mlx_cuda_13.libs" "$py/"
    cp -r "$lib/mlx/include" "$py/mlx/"
  fi
  export PYTHONPATH="$py" LMSPEC_PYTHON="$(command -v python3)"
}
