#!/usr/bin/env bash
# Install the suite into .venv (or $UDEAN_VENV) with its test extras.
#   ./install.sh          python packages only
#   ./install.sh --slurm  also install and start a single-node SLURM on localhost (root, Debian),
#                         which the SLURM tests use (see docs/hpc.md)
# On a machine without CUDA the CPU build of torch goes in first, so pip does not pull a
# multi-GB CUDA wheel; on a GPU node set UDEAN_TORCH to the torch requirement you want.
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
pip install -q -e ".[test,baselines]" 2>&1 | grep -v "^WARNING: Location" || true
python -c "import udean.cli, torch, deepspeed, mpi4py, h5py" || { echo "install.sh: import check failed" >&2; exit 1; }
if [ "${1:-}" = "--slurm" ]; then bash .ci/slurm.sh; fi
