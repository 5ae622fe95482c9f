#!/usr/bin/env bash
# The project's habits, run by scripts/test.sh before the tests: ruff, mypy (strict, as
# configured in pyproject.toml) and the import-layering contract (import-linter,
# [tool.importlinter] in pyproject.toml). Needs the venv of scripts/bootstrap.sh.
#
# The repository's folders install as quantfleet.agent, quantfleet.fleet, ... through
# setuptools' editable finder, which neither mypy nor import-linter can follow; both
# read a tree of symlinks that lays the folders out as the installed package is.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
TREE="$ROOT/build/lint"
rm -rf "$TREE"
mkdir -p "$TREE/quantfleet"
ln -s "$ROOT/quantfleet/__init__.py" "$TREE/quantfleet/__init__.py"
for part in agent fleet models demo; do
    ln -s "$ROOT/$part" "$TREE/quantfleet/$part"
done
for extra in "$ROOT"/quantfleet/*.py; do
    [ "$(basename "$extra")" = "__init__.py" ] || ln -s "$extra" "$TREE/quantfleet/$(basename "$extra")"
done
cd "$ROOT"
echo "==> ruff check"
ruff check .
echo "==> mypy -p quantfleet"
MYPYPATH="$TREE" mypy --config-file "$ROOT/pyproject.toml" --cache-dir "$ROOT/build/mypy-cache" \
    -p quantfleet
echo "==> lint-imports (the layering contract)"
(cd "$TREE" && PYTHONPATH="$TREE" lint-imports --no-cache --config "$ROOT/pyproject.toml")
