#!/usr/bin/env bash
# Set up .venv (scripts/setup.sh) and run the test suite.
#   bash scripts/test.sh            the default suite (< 10 minutes on 2 CPU cores)
#   bash scripts/test.sh --slow     only the slow tests (real detector, long statistical runs)
#   other arguments go to pytest
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
if [ "${1:-}" = "--slow" ]; then
    shift
    exec .venv/bin/python -m pytest -m slow "$@"
fi
exec .venv/bin/python -m pytest "$@"
