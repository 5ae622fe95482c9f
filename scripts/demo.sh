#!/usr/bin/env bash
# The main job, end to end on this machine: build the precision ladder, start a
# private broker, the fleet, real agents and simulated devices, drive traffic,
# promote Q8_0 -> Q4_K_M and catch Q4_K_M -> Q2_K in staged rollouts, print the
# audit trail and the signals, stop everything (docs/demo.md). Extra arguments
# go to `quantfleet demo` (e.g. --agents 3 --devices 200).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$ROOT/scripts/bootstrap.sh"
cd "$ROOT"
exec quantfleet demo --models-dir "${QUANTFLEET_MODELS_DIR:-$ROOT/var/models}" "$@"
