"""Speculative decoding speed: tokens/s with and without a draft on the same prompts, τ and per-position acceptance.

Prints one JSON line per configuration (machine-readable; SPEC §7) and a table on stderr. Without ``--draft_dir``
the draft is untrained (Medusa: fresh heads = copies of the target's lm_head; EAGLE-3: random weights), which
measures the pure overhead of drafting + tree verification (τ ≈ 1). For a trained draft export it first
(``python cli.py export ...``) or use ``python cli.py evaluate --ckpt_path ...``.

On a shared or loaded CPU pass ``--threads 1``: multi-threaded GEMMs with a few rows (the verification pass)
stall when the other cores are busy (measured here: 9 ms vs 0.23 ms for a [3, 576] x [576, 1536] matmul).

    python benchmarks/speculate_speed.py --algorithm medusa --draft_dir exports/medusa --modes chain tree --k 1 2 3
    python benchmarks/speculate_speed.py --algorithm eagle3 --draft_dir exports/eagle3 --num_prompts 16 \\
        --max_new_tokens 128 --device cuda
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
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--target", default="smollm2-135m-instruct", help="target source (builtin name, dir, GGUF, hub id)")
    p.add_argument("--target_dtype", default="float32")
    p.add_argument("--algorithm", choices=["medusa", "eagle3"], required=True)
    p.add_argument("--draft_dir", default=None, help="exported draft directory (default: an untrained draft)")
    p.add_argument("--prompts", default="chitchat", help="conversation file or builtin dataset name")
    p.add_argument("--num_prompts", type=int, default=8)
    p.add_argument("--max_new_tokens", type=int, default=64)
    p.add_argument("--modes", nargs="+", default=["chain", "tree"], choices=["chain", "tree"])
    p.add_argument("--k", nargs="+", type=int, default=[3], help="chain lengths to sweep")
    p.add_argument("--tree_topk", type=int, default=4)
    p.add_argument("--tree_depth", type=int, default=5)
    p.add_argument("--tree_total_tokens", type=int, default=24)
    p.add_argument("--medusa_heads", type=int, default=4, help="heads of the untrained Medusa draft")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--skinny_gemm", choices=["auto", "on", "off"], default="auto",
                   help="few-row products as W @ x^T (speculate/skinny.py); auto: on for fp32 on the CPU")
    return p.parse_args(argv)


def build_draft(args: argparse.Namespace, model):
    from spec_lightning.drafts.eagle3 import Eagle3Config, Eagle3Draft
    from spec_lightning.drafts.medusa import MedusaConfig, MedusaHeads

    cfg = model.config
    if args.algorithm == "medusa":
        if args.draft_dir:
            from spec_lightning.export.medusa import load_medusa_heads

            return load_medusa_heads(args.draft_dir)
        heads = MedusaHeads(MedusaConfig(hidden_size=cfg.hidden_size, vocab_size=cfg.vocab_size,
                                         num_heads=args.medusa_heads))
        heads.init_from_lm_head(model.get_output_embeddings().weight)
        return heads
    if args.draft_dir:
        from spec_lightning.export.eagle3 import load_eagle3_draft

        draft = load_eagle3_draft(args.draft_dir, target_num_hidden_layers=cfg.num_hidden_layers)
    else:
        torch.manual_seed(0)
        draft = Eagle3Draft(Eagle3Config.from_target_config(cfg, min(32000, cfg.vocab_size)))
    with torch.no_grad():  # the embedding is a frozen copy of the target's (exports may omit it)
        draft.embed_tokens.weight.copy_(model.get_input_embeddings().weight.to(draft.embed_tokens.weight.dtype))
    return draft


def main(argv: list[str] | None = None) -> None:
    from spec_lightning.datamodules.prompts import prompt_from_messages
    from spec_lightning.datamodules.sources import read_conversations
    from spec_lightning.speculate import cpu_decode_kernels, eos_token_ids, evaluate_acceptance
    from spec_lightning.speculate.eagle3 import Eagle3Drafter
    from spec_lightning.speculate.medusa import MedusaDrafter
    from spec_lightning.targets import FrozenTarget, load_target_model, load_tokenizer

    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    start = time.perf_counter()
    model = load_target_model(args.target, dtype=args.target_dtype).to(args.device)
    tok = load_tokenizer(args.target)
    draft = build_draft(args, model).to(args.device)
    prompts = []
    for conv in read_conversations(args.prompts, require_assistant=False).conversations:
        ids = prompt_from_messages(tok, conv["messages"])
        if ids:
            prompts.append(ids)
        if len(prompts) == args.num_prompts:
            break
    print(f"loaded target, draft and {len(prompts)} prompts in {time.perf_counter() - start:.1f}s", file=sys.stderr)
    if args.algorithm == "medusa":
        drafter = MedusaDrafter(draft)
    else:
        drafter = Eagle3Drafter(draft, args.tree_topk, args.tree_depth, args.tree_total_tokens)
    runner = FrozenTarget(model)
    skinny = None if args.skinny_gemm == "auto" else args.skinny_gemm == "on"
    skinny = all(p.device.type == "cpu" and p.dtype == torch.float32 for p in model.parameters()) \
        if skinny is None else skinny
    eos = eos_token_ids(model, tok)
    configs = [(m, k) for m in args.modes if m == "chain" for k in args.k] + (
        [("tree", 0)] if "tree" in args.modes else [])
    for mode, k in configs:
        with cpu_decode_kernels(model, draft, enabled=skinny):
            report, _ = evaluate_acceptance(runner, drafter, prompts, args.max_new_tokens, eos, mode=mode,
                                            num_draft_tokens=k, baseline=True, algorithm=args.algorithm)
        print(report.table(), file=sys.stderr)
        row = json.loads(report.to_json())
        row.update(benchmark="speculate_speed", target=args.target, draft_dir=args.draft_dir, device=args.device,
                   threads=torch.get_num_threads(), skinny_gemm=skinny, max_new_tokens=args.max_new_tokens,
                   tree=None if mode == "chain" else (
                       {"topk": args.tree_topk, "depth": args.tree_depth, "total_tokens": args.tree_total_tokens}
                       if args.algorithm == "eagle3" else "DEFAULT_MEDUSA_CHOICES"))
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
