#!/usr/bin/env bash
# GPU training benchmark (bounded to ~8 minutes): EAGLE-3 (TTT 7, Vd 32000) and Medusa (4 heads) on a
# Llama-3.1-8B-shaped random target (32 layers, hidden 4096, vocab 128256, untied) at T = 4096, bf16-mixed; prints
# JSON lines with tokens/s, peak allocated memory, model FLOPs per token and MFU against the GPU's measured bf16 matmul
# peak. Run alone on the GPU:   bash benchmarks/gpu_train_bench.sh [extra train_throughput.py args]
set -euo pipefail
cd "$(dirname "$0")/.."
exec timeout 480 python benchmarks/train_throughput.py --device cuda --targets llama8b-shaped --shaped_layers 32 \
    --shaped_untied --shaped_medusa_heads 4 --lengths 4096 --precision bf16-mixed --steps 3 --time_budget 420 "$@"
