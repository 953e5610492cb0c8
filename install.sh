#!/usr/bin/env bash
# Create .venv (or use $UDEAN_VENV) and install the suite with test extras.
# On a machine without CUDA the CPU build of torch goes in first, so no multi-GB CUDA
# wheel is pulled; on a GPU node set UDEAN_TORCH to the torch requirement you want.
set -euo pipefail
cd "$(dirname "$0")"
VENV=${UDEAN_VENV:-.venv}
if [ ! -x "$VENV/bin/python" ]; then python3 -m venv "$VENV"; fi
. "$VENV/bin/activate"
if ! python -c "import torch" 2>/dev/null; then
  if [ -n "${UDEAN_TORCH:-}" ]; then pip install -q "$UDEAN_TORCH"
  elif command -v nvidia-smi >/dev/null 2>&1; then pip install -q "torch>=2.4"
  else pip install -q "torch==2.13.0"; fi
fi
pip install -q -e ".[test,baselines]"
