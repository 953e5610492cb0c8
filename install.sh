#!/usr/bin/env bash
# Install the suite into .venv (or $UDEAN_VENV) with its test, baseline and benchmark extras.
#   ./install.sh                 torch's CUDA build where nvidia-smi answers, else the CPU build
#   ./install.sh --gpu           the CUDA build, also on a host without a GPU: a cluster's login
#                                node installing for its GPU nodes (docs/hpc.md, "Installing on a cluster")
#   ./install.sh --cpu           the CPU build (no multi-GB CUDA wheels)
#   ./install.sh --slurm         also install and start a single-node SLURM on localhost (root,
#                                Debian), which the SLURM tests use (see docs/hpc.md)
#   UDEAN_TORCH        torch requirement (default torch==2.13.0)
#   UDEAN_TORCH_INDEX  pip --index-url for torch, e.g. a CUDA-version wheel index (default: pip's)
# DeepSpeed goes in with no ops prebuilt (DS_BUILD_OPS=0): no CUDA compiler on the install host;
# the suite needs no custom DeepSpeed op (its Adam is torch's, udean/engines.py).
set -euo pipefail
cd "$(dirname "$0")"
want=auto slurm=0
for arg in "$@"; do
  case "$arg" in
    --gpu|--cpu) [ "$want" = auto ] || { echo "install.sh: choose one of --gpu, --cpu" >&2; exit 2; }; want=${arg#--} ;;
    --slurm) slurm=1 ;;
    *) echo "install.sh: unknown option $arg (allowed: --gpu, --cpu, --slurm)" >&2; exit 2 ;;
  esac
done
if [ "$want" = auto ]; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then want=gpu; else want=cpu; fi
  echo "install.sh: torch build: $want (nvidia-smi on this host; --gpu/--cpu to choose)" >&2
fi
VENV=${UDEAN_VENV:-.venv}
if [ ! -x "$VENV/bin/python" ]; then python3 -m venv "$VENV"; fi
. "$VENV/bin/activate"
TORCH=${UDEAN_TORCH:-torch==2.13.0}
index=()
if [ -n "${UDEAN_TORCH_INDEX:-}" ]; then index=(--index-url "$UDEAN_TORCH_INDEX"); fi
have=$(python -c "import torch; print('gpu' if torch.version.cuda else 'cpu')" 2>/dev/null || echo none)
if [ "$have" = none ]; then pip install -q "${index[@]}" "$TORCH"
elif [ "$have" != "$want" ]; then
  echo "install.sh: replacing the $have build of torch with the $want build" >&2
  pip install -q --force-reinstall "${index[@]}" "$TORCH"
fi
export DS_BUILD_OPS=0
pip install -q -e ".[test,baselines,bench]" 2>&1 | grep -v "^WARNING: Location" || true
python -c "from hpc.dist import quiet_deepspeed; quiet_deepspeed(); import udean.cli, torch, deepspeed, mpi4py, h5py" ||
  { echo "install.sh: import check failed" >&2; exit 1; }
if [ "$want" = gpu ] && ! python -c "import torch, sys; sys.exit(torch.version.cuda is None)"; then
  echo "install.sh: --gpu, but $(python -c 'import torch; print(torch.__version__)') is a CPU build: set" \
       "UDEAN_TORCH_INDEX to a CUDA wheel index (docs/hpc.md)" >&2
  exit 1
fi
if [ "$slurm" = 1 ]; then bash .ci/slurm.sh; fi
