#!/usr/bin/env bash
# Benchmarks lmspec against mlx-lm on an NVIDIA GPU, both on the same CUDA
# build of libmlx (docs/benchmarks.md). Needs what gpu-env.sh needs, the
# lmspec release binary in $LMSPEC_BIN (default .gpu/b/bin) and the mlx
# (cp312) and mlx-lm wheels in $LMSPEC_WHEELS (default /tmp/lmspec-wheels).
# Each case's JSON report goes to $BENCH_OUT (default /tmp/lmspec-bench-out),
# its table to stdout; $BENCH_FLAGS are added to each `lmspec bench`, and
# $PIN prefixes it (e.g. `taskset -c 2-5`; the mlx-lm process inherits the
# affinity).
set -euo pipefail
source .ci/gpu-env.sh
bin="${LMSPEC_BIN:-.gpu/b/bin}"
[ -x "$bin/lmspec" ] || { echo "gpu-bench: no $bin/lmspec; build it on the CPU machine (docs/gpu.md, step 1) and bring .gpu/ along (git-ignored)" >&2; exit 1; }
wheels="${LMSPEC_WHEELS:-/tmp/lmspec-wheels}"
py=/tmp/lmspec-site
if [ ! -d "$py/mlx_lm" ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target "$py" "$wheels"/*.whl
  cp "$lib/mlx/lib/libmlx.so" "$py/mlx/lib/" 2>/dev/null || { mkdir -p "$py/mlx/lib"; cp "$lib/mlx/lib/libmlx.so" "$py/mlx/lib/"; }
  cp -r "$lib/mlx_cuda_13.libs" "$py/"
  cp -r "$lib/mlx/include" "$py/mlx/"
fi
export PYTHONPATH="$py" LMSPEC_PYTHON=python3
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
"$bin"/lmspec doctor
models=/tmp/lmspec-bench-models
mkdir -p "$models"
mk_model() {  # name, extra args
  [ -d "$models/$1" ] || python3 porting-tools/python/bench_mlx_lm.py --make-random-llama "$models/$1" --like llama-1b "${@:2}" >&2
}
mk_model llama1b-q4 --dtype bfloat16 --bits 4 --group-size 64
mk_model llama1b-bf16 --dtype bfloat16
out="${BENCH_OUT:-/tmp/lmspec-bench-out}"
mkdir -p "$out"
for m in goldens/llama/model "$models/llama1b-q4" "$models/llama1b-bf16"; do
  case "$m" in goldens/*) name=tiny ;; *) name="$(basename "$m")" ;; esac
  echo "== $m"
  ${PIN:-} "$bin"/lmspec bench --model "$m" --prompt-tokens "${PROMPT:-512}" --gen-tokens "${GEN:-128}" \
    --repeat "${REPEAT:-5}" --weights quantized --against mlx-lm --json ${BENCH_FLAGS:-} > "$out/$name.json"
  python3 porting-tools/python/bench_table.py --summary "$out/$name.json"
done
