"""Useful (non-padding) tokens/s with and without packing, on a recipe's data and batch (JSON lines).

    python benchmarks/packing_throughput.py --algorithm eagle3 --data chitchat-smollm2 --max_length 256 --batch_size 4

Runs the same number of full optimiser steps (forward, backward, AdamW) on the first batches of the training
loader, unpacked (right-padded) and packed (``ChatDataModule(pack=True)``), and reports the time per step, the real
tokens per batch (padding excluded), useful tokens/s and trainable (assistant) tokens/s.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--algorithm", choices=["eagle3", "medusa"], default="eagle3")
    p.add_argument("--target", default="smollm2-135m-instruct")
    p.add_argument("--data", default="chitchat-smollm2")
    p.add_argument("--max_length", type=int, default=256)
    p.add_argument("--batch_size", type=int, default=4)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--threads", type=int, default=None)
    return p.parse_args(argv)


def run(args: argparse.Namespace, pack: bool) -> dict:
    from spec_lightning.datamodules import ChatDataModule
    from spec_lightning.modules.eagle3 import Eagle3Module
    from spec_lightning.modules.medusa1 import Medusa1Module

    if args.algorithm == "eagle3":
        module = Eagle3Module(target=args.target, draft_vocab_size=8192, ttt_length=5)
        compute = module.compute
    else:
        module = Medusa1Module(target=args.target, num_heads=3)
        compute = module.compute_losses
    data = ChatDataModule(tokenizer=args.target, data=args.data, max_length=args.max_length,
                          batch_size=args.batch_size, pack=pack, link=module.data_link)
    data.setup("fit")  # hands the training tokens (the draft vocabulary's source) back on the link
    module.configure_model()
    optimizer = torch.optim.AdamW(module.trainable_parameters(), lr=1e-4)
    batches = []
    for batch in data.train_dataloader():
        batches.append(batch)
        if len(batches) == args.steps + 1:
            break
    seconds, tokens, trainable = 0.0, 0, 0
    for i, batch in enumerate(batches):
        start = time.perf_counter()
        compute(batch)["loss"].backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if i:  # the first step warms up
            seconds += time.perf_counter() - start
            tokens += int(batch["real_tokens"].sum()) if pack else int(batch["attention_mask"].sum())
            trainable += int(batch["loss_mask"].sum())
    steps = len(batches) - 1
    width = batches[1]["input_ids"].shape[1]
    return {"benchmark": "packing_throughput", "algorithm": args.algorithm, "data": args.data, "pack": pack,
            "batch_size": args.batch_size, "max_length": args.max_length, "row_tokens": width,
            "seconds_per_step": round(seconds / steps, 3), "real_tokens_per_batch": round(tokens / steps, 1),
            "useful_tokens_per_s": round(tokens / seconds, 1), "trainable_tokens_per_s": round(trainable / seconds, 1),
            "threads": torch.get_num_threads()}


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    for pack in (False, True):
        print(json.dumps(run(args, pack)), flush=True)


if __name__ == "__main__":
    main()
