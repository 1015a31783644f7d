#!/usr/bin/env bash
# Set up .venv (scripts/setup.sh) and run the test suite.
#   bash scripts/test.sh            the default suite (< 10 minutes on 2 CPU cores)
#   bash scripts/test.sh --slow     only the slow tests (real detector, long statistical runs)
#   other arguments go to pytest
# The default run first checks the code with ruff (configuration in pyproject.toml).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
if [ "${1:-}" = "--slow" ]; then
    shift
    exec .venv/bin/python -m pytest -m slow "$@"
fi
.venv/bin/ruff check --quiet . || { echo "ruff check failed (see above)" >&2; exit 1; }
exec .venv/bin/python -m pytest "$@"
