"""Cost of verifying n tokens in one target forward, relative to a plain one-token decode step.

Speculative decoding pays off when verifying ``k + 1`` tokens costs little more than decoding one. On a GPU that
holds for k up to dozens; on a small CPU the matmuls of a 135M model stop being memory-bound after a few rows, so
each extra verified token costs a visible fraction of a step. This prints, per ``n``, the measured time of one
target forward (KV cache of ``--context`` tokens, aux-layer capture as EAGLE-3 needs) plus its lm_head, and the ratio
to ``n = 1``: with a draft costing ``d`` one-token steps per round, a chain of k drafts gives a speedup of about
``tau / (ratio[k + 1] + d)``.

    python benchmarks/verify_cost.py --threads 1 2 --max_tokens 9 --skinny off on
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--target", default="smollm2-135m-instruct", help="target source (builtin name, dir, GGUF, hub id)")
    p.add_argument("--target_dtype", default="float32")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", nargs="+", type=int, default=[1], help="torch CPU thread counts to sweep")
    p.add_argument("--max_tokens", type=int, default=9, help="verify 1..max_tokens tokens per forward")
    p.add_argument("--context", type=int, default=200, help="tokens already in the KV cache")
    p.add_argument("--repeats", type=int, default=15, help="timed forwards per n (the median is reported)")
    p.add_argument("--skinny", nargs="+", choices=["on", "off"], default=["off", "on"],
                   help="few-row products as W @ x^T (speculate/skinny.py) off and/or on")
    return p.parse_args(argv)


def time_forward(runner, cache, context: int, n: int, repeats: int, vocab: int, aux: tuple[int, ...]) -> float:
    """Median seconds of one forward of ``n`` random tokens after ``context`` cached ones, plus its logits."""
    from spec_lightning.targets import keep_cache_positions

    times = []
    for i in range(repeats + 2):  # two untimed warm-ups
        ids = torch.randint(0, vocab, (n,))
        start = time.perf_counter()
        step = runner.step(ids, cache, aux_layer_ids=aux)
        runner.logits(step.hidden).argmax(-1).tolist()
        if i >= 2:
            times.append(time.perf_counter() - start)
        keep_cache_positions(cache, torch.arange(context))
    return statistics.median(times)


def main(argv: list[str] | None = None) -> None:
    from spec_lightning.speculate import cpu_decode_kernels
    from spec_lightning.targets import FrozenTarget, load_target_model

    args = parse_args(argv)
    model = load_target_model(args.target, dtype=args.target_dtype).to(args.device)
    layers = model.config.num_hidden_layers
    aux = (1, layers // 2 - 1, layers - 4)  # EAGLE-3's default aux layers
    vocab = model.config.vocab_size
    for threads in args.threads:
        torch.set_num_threads(threads)
        runner = FrozenTarget(model)
        for skinny in args.skinny:
            with cpu_decode_kernels(model, enabled=skinny == "on"):
                cache = runner.new_cache()
                runner.step(torch.randint(0, vocab, (args.context,)), cache)
                one = None
                for n in range(1, args.max_tokens + 1):
                    seconds = time_forward(runner, cache, args.context, n, args.repeats, vocab, aux)
                    one = one or seconds
                    print(json.dumps({"benchmark": "verify_cost", "target": args.target, "device": args.device,
                                      "threads": threads, "skinny_gemm": skinny == "on", "context": args.context,
                                      "tokens": n, "ms": round(1000 * seconds, 2),
                                      "ratio_to_one_token": round(seconds / one, 3)}), flush=True)

if __name__ == "__main__":
    main()
