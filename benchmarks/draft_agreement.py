"""Why is an EAGLE-3 draft's acceptance low on a prompt set? Agreement with the target by the target's confidence.

    python benchmarks/draft_agreement.py --ckpt lightning_logs/eagle3/version_0/checkpoints/last.ckpt
    python benchmarks/draft_agreement.py --ckpt <ckpt> --prompts heldout-instructions my_prompts.jsonl

For each prompt set (builtin names or conversation files): the target answers each prompt greedily
(``--max_new_tokens``); then, teacher-forced on prompt + answer, the draft's TTT step 0 at answer position t predicts
token t + 2 (the first token a decoding round proposes) and is compared with the target's greedy token there. One
JSON line per set:

* ``target_top1_mean``: the target's mean top-1 probability over the answer tokens (how predictable the target is);
* ``step0_agreement``: the fraction of those positions where the draft's argmax is the target's token (the
  teacher-forced counterpart of first-position acceptance);
* ``by_target_confidence``: for target top-1 probability in [0, 0.5), [0.5, 0.9), [0.9, 1]: the share of positions
  and the draft's agreement there;
* ``in_draft_vocab``: the share of target tokens the draft vocabulary holds (the others are certain misses).

A draft that misses tokens the target is sure of has not learned that kind of text; one that misses only where the
target hesitates is near what its features allow. Run alone on the CPU (one target generation per prompt).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

BUCKETS = ((0.0, 0.5), (0.5, 0.9), (0.9, 1.0))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ckpt", required=True, help="an EAGLE-3 training checkpoint (Eagle3Module)")
    p.add_argument("--prompts", nargs="+", default=["heldout-chitchat", "heldout-instructions"])
    p.add_argument("--num_prompts", type=int, default=40)
    p.add_argument("--max_new_tokens", type=int, default=64)
    p.add_argument("--threads", type=int, default=None)
    return p.parse_args(argv)


def load_module(ckpt: str):
    """The Eagle3Module a training checkpoint describes (its hyperparameters), with the checkpoint's draft weights."""
    from spec_lightning.checkpoints import load_draft_weights, read_checkpoint
    from spec_lightning.modules.eagle3 import Eagle3Module

    hparams = {k: v for k, v in read_checkpoint(ckpt).get("hyper_parameters", {}).items() if not k.startswith("_")}
    module = Eagle3Module(**hparams)
    load_draft_weights(module, ckpt)
    return module.eval()


@torch.no_grad()
def greedy_answer(model, prompt: list[int], max_new_tokens: int) -> list[int]:
    ids = torch.tensor([prompt])
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens, do_sample=False)
    return out[0, len(prompt):].tolist()


@torch.no_grad()
def agreement_rows(module, prompt: list[int], answer: list[int]) -> tuple[list[bool], list[float], list[bool]]:
    """Per counted step-0 pair: (draft agrees with the target's token, target top-1 probability, token in vocab)."""
    ids = torch.tensor([prompt + answer])
    loss_mask = torch.zeros_like(ids)
    loss_mask[:, len(prompt):] = 1
    feats = module.target(ids, aux_layer_ids=module.draft_config.aux_layer_ids)  # one target pass, used twice:
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "loss_mask": loss_mask,
             "aux_hidden": feats.aux_hidden, "final_hidden": feats.final_hidden}  # compute reads cached features
    out = module.compute(batch)
    correct, valid = out["correct"][0, 0], out["valid"][0, 0]  # step 0, row 0: position t predicts token t + 2
    positions = valid.nonzero().flatten()
    probs = torch.softmax(module.target.logits(feats.final_hidden[0, positions + 1]), dim=-1)  # the teacher rows
    top1, token = probs.max(dim=-1)
    return correct[positions].tolist(), top1.tolist(), module.draft.t2d[token].tolist()


def summarise(name: str, agree: list[bool], confidence: list[float], in_vocab: list[bool]) -> dict:
    a, c, v = torch.tensor(agree, dtype=torch.float32), torch.tensor(confidence), torch.tensor(in_vocab)
    row = {"benchmark": "draft_agreement", "prompts": name, "positions": len(agree),
           "target_top1_mean": round(c.mean().item(), 3), "step0_agreement": round(a.mean().item(), 3),
           "in_draft_vocab": round(v.float().mean().item(), 3), "by_target_confidence": {}}
    for lo, hi in BUCKETS:
        sel = (c >= lo) & ((c < hi) if hi < 1.0 else (c <= hi))
        share = sel.float().mean().item()
        row["by_target_confidence"][f"{lo}-{hi}"] = {
            "share": round(share, 3), "agreement": round(a[sel].mean().item(), 3) if sel.any() else None}
    return row


def main(argv: list[str] | None = None) -> None:
    from spec_lightning.datamodules.prompts import prompts_from_file
    from spec_lightning.targets.loading import load_tokenizer

    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    module = load_module(args.ckpt)
    tokenizer = load_tokenizer(module.hparams["target"])
    for name in args.prompts:
        agree, confidence, in_vocab = [], [], []
        for prompt in prompts_from_file(name, tokenizer, limit=args.num_prompts):
            answer = greedy_answer(module.target.model, prompt, args.max_new_tokens)
            rows = agreement_rows(module, prompt, answer)
            agree += rows[0]
            confidence += rows[1]
            in_vocab += rows[2]
        print(json.dumps(summarise(name, agree, confidence, in_vocab)), flush=True)


if __name__ == "__main__":
    main()
