#!/usr/bin/env bash
# The llama.cpp side of `lmspec bench --against llama.cpp`: a venv of its
# own (.venv-llama-cpp) with llama-cpp-python built from source for this
# machine (a few minutes on 2 cores; needs cmake and a C++ compiler, which
# the setup installs). Not part of the test setup.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=.venv-llama-cpp
if [ -x "$VENV/bin/python" ] && "$VENV/bin/python" -c "import llama_cpp, numpy" 2>/dev/null; then
    echo "$VENV: llama-cpp-python $("$VENV/bin/python" -c 'import llama_cpp; print(llama_cpp.__version__)') is there"
    exit 0
fi
python3 -m venv "$VENV"
"$VENV/bin/pip" install --quiet numpy
CMAKE_BUILD_PARALLEL_LEVEL="$(nproc)" "$VENV/bin/pip" install --quiet llama-cpp-python==0.3.36
"$VENV/bin/python" -c "import llama_cpp; print('llama-cpp-python', llama_cpp.__version__)"
