"""Write held-out chitchat prompts that no default recipe trains on (JSONL, first user turn only).

A conversation qualifies when it is in the validation split of the human-data recipe (ChatDataModule on
``chitchat``, seed 0, val_fraction 0.05, max_length 256) and is not one of the prompts the self-distilled builtin set
``chitchat-smollm2`` was generated from. Both recipes' τ are then measured on the same unseen prompts:

    python benchmarks/make_heldout_prompts.py --out spec_lightning/data/heldout_chitchat.jsonl --num 32
    python cli.py evaluate --config configs/eagle3.yaml --ckpt_path <ckpt> --prompts heldout_prompts.jsonl
"""

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from spec_lightning.datamodules import ChatDataModule  # noqa: E402
from spec_lightning.datamodules.catalog import resolve_source  # noqa: E402
from spec_lightning.datamodules.sources import read_conversations  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--num", type=int, default=32)
    args = ap.parse_args()
    human = ChatDataModule(data="chitchat", max_length=256, val_fraction=0.05, seed=0)
    human.setup("fit")
    held_out = set(human.val_dataset["id"])
    distilled = {c["id"] for c in read_conversations(resolve_source("chitchat-smollm2")).conversations}
    convs = {c["id"]: c for c in read_conversations("chitchat", require_assistant=False).conversations}
    rows = []
    for cid in sorted(held_out - distilled):
        first_user = next(m for m in convs[cid]["messages"] if m["role"] == "user")
        rows.append({"id": cid, "messages": [first_user]})
        if len(rows) >= args.num:
            break
    with open(args.out, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    print(json.dumps({"out": args.out, "prompts": len(rows), "candidates": len(held_out - distilled)}))


if __name__ == "__main__":
    main()
