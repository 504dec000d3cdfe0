"""Regeneration throughput (generated tokens/s) of the target at several batch sizes (JSON lines on stdout).

    python benchmarks/regenerate_throughput.py --target smollm2-135m-instruct --data chitchat \
        --num_prompts 16 --max_new_tokens 32 --batch_sizes 1 8 16

The same prompts (the first ``num_prompts`` usable openers, sorted by length as ``regenerate`` does) are
answered greedily at every batch size; tokens count the generated tokens including the end-of-turn token.
"""

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from spec_lightning.datamodules.regenerate import GenerationSettings, Generator, _select_samples  # noqa: E402
from spec_lightning.datamodules.sources import read_conversations  # noqa: E402
from spec_lightning.targets import load_target_model, load_tokenizer  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--target", default="smollm2-135m-instruct")
    ap.add_argument("--data", default="chitchat")
    ap.add_argument("--num_prompts", type=int, default=16)
    ap.add_argument("--max_new_tokens", type=int, default=32)
    ap.add_argument("--batch_sizes", type=int, nargs="+", default=[1, 8, 16])
    args = ap.parse_args()
    settings = GenerationSettings(max_new_tokens=args.max_new_tokens)
    gen = Generator(load_target_model(args.target), load_tokenizer(args.target), settings)
    samples = _select_samples(read_conversations(args.data, require_assistant=False).conversations, gen,
                              args.num_prompts, [])
    samples.sort(key=lambda s: s.prompt_length)
    prompts = [gen.prompt_ids(s.system + [{"role": "user", "content": s.user_turns[0]}]) for s in samples]
    gen.generate(prompts[:1], 0)  # warm-up
    for bs in args.batch_sizes:
        start = time.perf_counter()
        tokens = 0
        for i in range(0, len(prompts), bs):
            for ids, reason in gen.generate(prompts[i:i + bs], 0):
                tokens += len(ids) + (reason == "stop")
        seconds = time.perf_counter() - start
        print(json.dumps({
            "benchmark": "regenerate_throughput", "target": args.target, "data": args.data,
            "num_prompts": len(prompts), "max_new_tokens": args.max_new_tokens, "batch_size": bs,
            "threads": torch.get_num_threads(), "generated_tokens": tokens, "seconds": round(seconds, 2),
            "tokens_per_s": round(tokens / seconds, 1), "prompts_per_s": round(len(prompts) / seconds, 2),
        }), flush=True)


if __name__ == "__main__":
    main()
