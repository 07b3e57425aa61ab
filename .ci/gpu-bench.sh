#!/usr/bin/env bash
# Benchmarks lmspec against mlx-lm on an NVIDIA GPU, both on the same CUDA
# build of libmlx (docs/benchmarks.md). Needs what gpu-env.sh needs, the
# lmspec release binary in $LMSPEC_BIN (default .gpu/b/bin) and the mlx
# (cp312) and mlx-lm wheels in $LMSPEC_WHEELS (default /tmp/lmspec-wheels).
# Each case's JSON report goes to $BENCH_OUT (default /tmp/lmspec-bench-out),
# its table to stdout; $BENCH_FLAGS are added to each `lmspec bench`, and
# $PIN prefixes it (e.g. `taskset -c 2-5`; the mlx-lm process inherits the
# affinity). With LARGE=1 an 8B-shaped llama in bfloat16 is added. Each dense
# model is also run by Hugging Face transformers on the machine's own PyTorch
# (porting-tools/python/bench_transformers.py: static cache, torch.compile;
# TRANSFORMERS=0 skips it), its JSON beside lmspec's. TINY=0 leaves out the
# tiny golden model.
set -euo pipefail
source .ci/gpu-env.sh
bin="${LMSPEC_BIN:-.gpu/b/bin}"
[ -x "$bin/lmspec" ] || { echo "gpu-bench: no $bin/lmspec; build it on the CPU machine (docs/gpu.md, step 1) and bring .gpu/ along (git-ignored)" >&2; exit 1; }
mlx_python || { echo "gpu-bench: no mlx / mlx-lm wheels in ${LMSPEC_WHEELS:-/tmp/lmspec-wheels}" >&2; exit 1; }
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
"$bin"/lmspec doctor
models=/tmp/lmspec-bench-models
mkdir -p "$models"
mk_model() {  # name, extra args
  [ -d "$models/$1" ] || python3 porting-tools/python/bench_mlx_lm.py --make-random-llama "$models/$1" --like llama-1b "${@:2}" >&2
}
mk_model llama1b-q4 --dtype bfloat16 --bits 4 --group-size 64
mk_model llama1b-bf16 --dtype bfloat16
list=("$models/llama1b-q4" "$models/llama1b-bf16")
[ "${TINY:-1}" = 0 ] || list=(goldens/llama/model "${list[@]}")
if [ "${LARGE:-0}" = 1 ]; then
  [ -d "$models/llama8b-bf16" ] || python3 porting-tools/python/bench_mlx_lm.py --make-random-llama "$models/llama8b-bf16" --like llama-8b --dtype bfloat16 >&2
  list+=("$models/llama8b-bf16")
fi
out="${BENCH_OUT:-/tmp/lmspec-bench-out}"
mkdir -p "$out"
for m in "${list[@]}"; do
  # The tiny model's context is 512 positions: its prompt is shorter.
  case "$m" in goldens/*) name=tiny prompt=256 ;; *) name="$(basename "$m")" prompt="${PROMPT:-512}" ;; esac
  echo "== $m"
  ${PIN:-} "$bin"/lmspec bench --model "$m" --prompt-tokens "$prompt" --gen-tokens "${GEN:-128}" \
    --repeat "${REPEAT:-5}" --weights quantized --against mlx-lm --json ${BENCH_FLAGS:-} > "$out/$name.json"
  python3 porting-tools/python/bench_table.py --summary "$out/$name.json"
  if [ "${TRANSFORMERS:-1}" = 1 ] && [ "$name" != tiny ] && ! grep -q '"quantization"' "$m/config.json"; then
    python3 porting-tools/python/bench_transformers.py --model "$m" --prompt-tokens "${PROMPT:-512}" \
      --gen-tokens "${GEN:-128}" --repeat "${REPEAT:-5}" > "$out/$name-transformers.json"
    python3 -c 'import json, sys; d = json.load(open(sys.argv[1])); print(d["engine"], "prefill tok/s", round(d["prefill_tps"]["median"], 1), "decode tok/s", round(d["decode_tps"]["median"], 1))' "$out/$name-transformers.json"
  fi
done
