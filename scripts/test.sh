#!/usr/bin/env bash
# The test command: sets up .venv, starts the services, runs ruff, mypy and the
# import-layering contract (scripts/lint.sh), then the whole suite.
# Extra arguments go to pytest (e.g. scripts/test.sh -k ladder).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$ROOT/scripts/bootstrap.sh"
bash "$ROOT/scripts/services.sh"
bash "$ROOT/scripts/lint.sh"
cd "$ROOT"
exec python -m pytest "$@"
