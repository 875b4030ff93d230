#!/usr/bin/env bash
# Create .venv with ctbench installed (editable). A torch that the base Python already has
# (for example a CUDA build) is kept: the venv sees it and pip installs no other. Without one,
# torch==2.13.0 is installed (set CTBENCH_TORCH to choose another requirement).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  if "$PYTHON" -c "import torch" 2>/dev/null; then
    "$PYTHON" -m venv --system-site-packages .venv
  else
    "$PYTHON" -m venv .venv
  fi
fi
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
  .venv/bin/pip install -q "${CTBENCH_TORCH:-torch==2.13.0}"
fi
.venv/bin/pip install -q -e ".[test,analysis,certify,sweep,watch,cluster]"
