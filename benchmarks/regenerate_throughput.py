"""Regeneration throughput (generated tokens/s) of the target: HF ``generate`` on padded batches against continuous
batching, at several batch sizes (JSON lines on stdout; run it alone on the machine).

    python benchmarks/regenerate_throughput.py --target smollm2-135m-instruct --data chitchat \
        --num_prompts 128 --max_new_tokens 128 --batch_sizes 16 32 64

The same prompts (the first ``num_prompts`` usable openers, sorted by length as ``regenerate`` does) are answered
greedily by both schedulers at every batch size; tokens count the generated tokens including the end-of-turn token,
and ``same_as_hf_generate`` counts the answers the two schedulers agree on. ``speedup`` is continuous over HF
``generate`` within this run.
"""

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from spec_lightning.datagen.regenerate import GenerationSettings, Generator, _select_samples  # noqa: E402
from spec_lightning.datamodules.sources import read_conversations  # noqa: E402
from spec_lightning.targets import load_target_model, load_tokenizer  # noqa: E402


def _timed(gen: Generator, prompts: list[list[int]]) -> tuple[list, float, int]:
    start = time.perf_counter()
    out = gen.generate(prompts, 0)
    seconds = time.perf_counter() - start
    return out, seconds, sum(len(ids) + (reason == "stop") for ids, reason in out)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--target", default="smollm2-135m-instruct")
    ap.add_argument("--data", default="chitchat")
    ap.add_argument("--num_prompts", type=int, default=128)
    ap.add_argument("--max_new_tokens", type=int, default=128)
    ap.add_argument("--batch_sizes", type=int, nargs="+", default=[32])
    args = ap.parse_args(argv)
    model, tokenizer = load_target_model(args.target), load_tokenizer(args.target)
    settings = GenerationSettings(max_new_tokens=args.max_new_tokens)
    probe = Generator(model, tokenizer, settings)
    samples = _select_samples(read_conversations(args.data, require_assistant=False).conversations, probe,
                              args.num_prompts, [])
    samples.sort(key=lambda s: (s.prompt_length, s.index))
    prompts = [probe.prompt_ids(s.system + [{"role": "user", "content": s.user_turns[0]}]) for s in samples]
    probe.generate(prompts[:2], 0, max_new_tokens=4)  # warm-up
    for bs in args.batch_sizes:
        padded = Generator(model, tokenizer, settings, slots=bs)
        padded.continuous = False  # HF generate on left-padded batches of bs prompts
        hf_out, hf_s, hf_tokens = _timed(padded, prompts)
        cb_out, cb_s, cb_tokens = _timed(Generator(model, tokenizer, settings, slots=bs), prompts)
        print(json.dumps({
            "benchmark": "regenerate_throughput", "target": args.target, "data": args.data,
            "num_prompts": len(prompts), "max_new_tokens": args.max_new_tokens, "batch_size": bs,
            "threads": torch.get_num_threads(),
            "hf_generate": {"seconds": round(hf_s, 4), "tokens": hf_tokens, "tokens_per_s": round(hf_tokens / hf_s, 1)},
            "continuous": {"seconds": round(cb_s, 4), "tokens": cb_tokens, "tokens_per_s": round(cb_tokens / cb_s, 1)},
            "speedup": round(hf_s / cb_s, 2),
            "same_as_hf_generate": sum(a == b for a, b in zip(hf_out, cb_out, strict=True)),
        }), flush=True)


if __name__ == "__main__":
    main()
