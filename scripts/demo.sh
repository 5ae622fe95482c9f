#!/usr/bin/env bash
# The main job, end to end: build the precision ladder of the default model
# and answer one prompt on every variant. Extra arguments go to `quantfleet demo`.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$ROOT/scripts/bootstrap.sh"
cd "$ROOT"
exec quantfleet demo --models-dir "${QUANTFLEET_MODELS_DIR:-$ROOT/var/models}" "$@"
