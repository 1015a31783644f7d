#!/usr/bin/env bash
# Create .venv in the repository root and install relay-diffusion into it.
#   TORCH_SPEC   which PyTorch to install (default: torch==2.13.0, a CPU build on the project's
#                machines; set e.g. TORCH_SPEC=torch to take your platform's CUDA build instead)
#   RDM_EXTRAS   extras of the package to install (default: test,eval)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip >/dev/null 2>&1 || true
.venv/bin/python -m pip install -q "${TORCH_SPEC:-torch==2.13.0}"
.venv/bin/python -m pip install -q -e ".[${RDM_EXTRAS:-test,eval}]"
