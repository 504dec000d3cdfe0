"""Tokenisation throughput of a chat dataset with the target's chat template (JSON line on stdout).

    python benchmarks/tokenize_throughput.py --data chitchat --tokenizer smollm2-135m-instruct --max_length 512
"""

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from spec_lightning.datamodules.chat_datamodule import tokenize_source  # noqa: E402
from spec_lightning.targets import load_tokenizer  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", default="chitchat")
    ap.add_argument("--tokenizer", default="smollm2-135m-instruct")
    ap.add_argument("--max_length", type=int, default=512)
    args = ap.parse_args()
    tok = load_tokenizer(args.tokenizer)
    start = time.perf_counter()
    _, report = tokenize_source(tok, args.data, args.max_length, "truncate", "skip")
    seconds = time.perf_counter() - start
    print(json.dumps({
        "benchmark": "tokenize_throughput", "data": args.data, "tokenizer": args.tokenizer,
        "max_length": args.max_length, "conversations": report["conversations_read"], "kept": report["kept"],
        "tokens": report["tokens"], "seconds": round(seconds, 2),
        "conversations_per_s": round(report["conversations_read"] / seconds, 1),
        "tokens_per_s": round(report["tokens"] / seconds, 1),
    }))


if __name__ == "__main__":
    main()
