#!/usr/bin/env bash
# Install PyTorch into the given Python's environment: the CUDA build where an NVIDIA
# GPU answers, the CPU build everywhere else (a bare `torch` requirement would pull a
# multi-GB CUDA build onto machines that cannot use it).
set -euo pipefail
PY=${1:?usage: install-torch.sh PYTHON}
VERSION=${TORCH_VERSION:-2.13.0}
if "$PY" -c "import torch" 2>/dev/null; then
  exit 0
fi
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
  "$PY" -m pip install "torch==${VERSION}"
else
  # The CPU wheel: from a local wheel folder or index when the machine has one,
  # otherwise from PyTorch's CPU index.
  "$PY" -m pip install "torch==${VERSION}+cpu" 2>/dev/null \
    || "$PY" -m pip install "torch==${VERSION}+cpu" --extra-index-url https://download.pytorch.org/whl/cpu
fi
