"""Acceptance-length evaluation on held-out prompts: τ, per-position acceptance, tokens/s and speedup (SPEC §7).

τ (acceptance length) = tokens emitted per target forward in lossless speculative decoding = (accepted draft
tokens + the target's own token) per verification round. The prefill forward and its token are excluded.
Position j (1-based) counts as accepted in a round iff the first j draft tokens (chain) / a path of depth j
(tree) were accepted; its rate is over the rounds where the draft offered depth >= j.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from spec_lightning.speculate.decode import GenerationResult, Mode, speculative_generate, target_generate
from spec_lightning.speculate.drafter import Drafter
from spec_lightning.speculate.target import TargetRunner


@dataclass
class AcceptanceStats:
    """Counts accumulated over generations (integers; rates are derived)."""

    rounds: int = 0
    emitted: int = 0
    accepted_at: list[int] = field(default_factory=list)  # [j-1]: rounds accepting position j
    drafted_at: list[int] = field(default_factory=list)  # [j-1]: rounds offering position j

    def update(self, result: GenerationResult) -> None:
        for accepted, drafted, emitted in zip(result.accepted, result.drafted, result.emitted, strict=True):
            self.rounds += 1
            self.emitted += emitted
            grow = max(drafted - len(self.drafted_at), 0)
            self.drafted_at += [0] * grow
            self.accepted_at += [0] * grow
            for j in range(drafted):
                self.drafted_at[j] += 1
                self.accepted_at[j] += int(accepted > j)

    @property
    def accept_length(self) -> float:
        """τ: emitted tokens per target forward (prefill excluded); 0 without rounds."""
        return self.emitted / self.rounds if self.rounds else 0.0

    @property
    def position_rates(self) -> list[float]:
        return [a / d if d else 0.0 for a, d in zip(self.accepted_at, self.drafted_at, strict=True)]


@dataclass
class EvalReport:
    """What ``evaluate`` prints: one row of the table and one JSON line."""

    algorithm: str
    mode: str
    num_draft_tokens: int
    temperature: float
    prompts: int
    new_tokens: int
    rounds: int
    accept_length: float
    position_rates: list[float]
    spec_tokens_per_s: float
    baseline_tokens_per_s: float | None
    speedup: float | None
    identical_outputs: int | None  # prompts whose greedy output equals the baseline's (None when not compared)
    draft_ms_per_round: float = 0.0  # draft time per verification round
    verify_ms_per_round: float = 0.0  # target verification time per round (forward, logits, acceptance, cache)
    baseline_ms_per_forward: float | None = None  # the target alone: one one-token forward + logits

    @property
    def break_even_accept_length(self) -> float | None:
        """τ at which a round (draft + verification) costs as much as the τ one-token forwards it replaces.

        Speedup ≈ τ / break-even, so ``1.5 * break_even`` is the τ these costs need for a 1.5x speedup.
        """
        if not self.baseline_ms_per_forward:
            return None
        return (self.draft_ms_per_round + self.verify_ms_per_round) / self.baseline_ms_per_forward

    def to_json(self) -> str:
        row = {**asdict(self), "break_even_accept_length": self.break_even_accept_length}
        return json.dumps({k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items()})

    def table(self) -> str:
        rows = [
            ("algorithm / mode", f"{self.algorithm} / {self.mode}" + (f" (k={self.num_draft_tokens})"
                                                                       if self.mode == "chain" else "")),
            ("prompts / new tokens", f"{self.prompts} / {self.new_tokens}"),
            ("target forwards (prefill excluded)", str(self.rounds)),
            ("acceptance length τ", f"{self.accept_length:.3f}"),
        ]
        rows += [(f"  accept rate, position {j + 1}", f"{r:.3f}") for j, r in enumerate(self.position_rates)]
        rows.append(("speculative tokens/s", f"{self.spec_tokens_per_s:.2f}"))
        rows.append(("  per round: draft / verify ms", f"{self.draft_ms_per_round:.1f} / {self.verify_ms_per_round:.1f}"))
        if self.baseline_tokens_per_s is not None:
            rows.append(("target-only tokens/s", f"{self.baseline_tokens_per_s:.2f}"))
            rows.append(("  per forward ms", f"{self.baseline_ms_per_forward:.1f}"))
            rows.append(("speedup", f"{self.speedup:.3f}x"))
            rows.append(("break-even τ (1.5x needs 1.5 times it)", f"{self.break_even_accept_length:.3f}"))
        if self.identical_outputs is not None:
            rows.append(("outputs identical to target greedy", f"{self.identical_outputs}/{self.prompts}"))
        width = max(len(r[0]) for r in rows)
        return "\n".join(f"{name:<{width}}  {value}" for name, value in rows)


# --- prompts ----------------------------------------------------------------------------------------------------
def prompt_from_tokenized(input_ids: Sequence[int], loss_mask: Sequence[int]) -> list[int] | None:
    """The tokens before the first trainable (assistant) token: the first user turn(s) with the generation prompt.

    ``None`` when the row has no assistant token or nothing before it.
    """
    for i, m in enumerate(loss_mask):
        if m:
            return list(input_ids[:i]) if i > 0 else None
    return None


def prompt_from_messages(tokenizer, messages: Sequence[dict]) -> list[int] | None:
    """The conversation cut before its first assistant turn, rendered with the generation prompt."""
    head = []
    for m in messages:
        if m["role"] == "assistant":
            break
        head.append({"role": m["role"], "content": m["content"]})
    if not any(m["role"] == "user" for m in head):
        return None
    ids = tokenizer.apply_chat_template(head, tokenize=True, add_generation_prompt=True)
    if hasattr(ids, "keys") and "input_ids" in ids:  # some tokenizers return a BatchEncoding
        ids = ids["input_ids"]
    return [int(i) for i in ids]


def prompts_from_dataset(rows: Iterable[dict], limit: int | None = None, max_prompt_tokens: int | None = None) -> list[list[int]]:
    """Prompts from tokenised rows (``input_ids``/``loss_mask``, e.g. a ChatDataModule's ``val_dataset``)."""
    out: list[list[int]] = []
    for row in rows:
        if limit is not None and len(out) >= limit:
            break
        prompt = prompt_from_tokenized(row["input_ids"], row["loss_mask"])
        if prompt and (max_prompt_tokens is None or len(prompt) <= max_prompt_tokens):
            out.append(prompt)
    return out


# --- drafts from trained modules (duck-typed: speculate never imports the Lightning modules) ----------------------
def runner_and_drafter(module: nn.Module, tree_topk: int = 4, tree_depth: int = 5, tree_total_tokens: int = 24,
                       medusa_choices: Sequence[Sequence[int]] | None = None) -> tuple[TargetRunner, Drafter]:
    """The target runner and drafter of a trained ``Eagle3Module`` (``.draft``) or ``MedusaModule`` (``.heads``)."""
    from spec_lightning.speculate.eagle3 import Eagle3Drafter
    from spec_lightning.speculate.medusa import MedusaDrafter

    draft = getattr(module, "draft", None)
    heads = getattr(module, "heads", None)
    if draft is not None:
        drafter: Drafter = Eagle3Drafter(draft, tree_topk, tree_depth, tree_total_tokens)
    elif heads is not None:
        drafter = MedusaDrafter(heads, medusa_choices)
    else:
        raise ValueError(f"{type(module).__name__} has neither an EAGLE-3 'draft' nor Medusa 'heads' "
                         "(did configure_model() run?)")
    if getattr(module, "mode", None) == "medusa2" and getattr(module, "base", None) is not None:
        target = module._base_lm()  # Medusa-2 heads belong to the jointly trained base: verify with it
    else:
        target = getattr(module, "target", None)
    if target is None:
        raise ValueError(f"{type(module).__name__} has no target loaded (call configure_model() first)")
    return TargetRunner(target, drafter.aux_layer_ids), drafter


def eos_token_ids(model: nn.Module, tokenizer=None) -> list[int]:
    """Stop tokens: the model's generation config and config ``eos_token_id`` (int or list) and the tokenizer's."""
    from spec_lightning.targets import FrozenTarget

    if isinstance(model, FrozenTarget):
        model = model.model
    ids: list[int] = []
    for source in (getattr(model, "generation_config", None), getattr(model, "config", None), tokenizer):
        value = getattr(source, "eos_token_id", None) if source is not None else None
        for i in value if isinstance(value, (list, tuple)) else [value]:
            if i is not None and int(i) not in ids:
                ids.append(int(i))
    return ids


def algorithm_name(drafter: Drafter) -> str:
    return "eagle3" if drafter.aux_layer_ids else "medusa"


def evaluate_acceptance(
    runner: TargetRunner,
    drafter: Drafter,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int = 64,
    eos_token_ids: Sequence[int] = (),
    mode: Mode = "chain",
    num_draft_tokens: int = 4,
    temperature: float = 0.0,
    baseline: bool = True,
    seed: int = 0,
    progress: bool = False,
) -> tuple[EvalReport, AcceptanceStats]:
    """Decode every prompt speculatively (and with the target alone when ``baseline``) and summarise.

    Speculative and baseline runs alternate prompt by prompt, after one untimed warm-up of each, so load changes
    on a shared machine hit both alike.
    """
    if not prompts:
        raise ValueError("no prompts to evaluate (empty prompt list)")
    stats = AcceptanceStats()
    generator = torch.Generator(device=runner.device).manual_seed(seed)
    kwargs = {"max_new_tokens": max_new_tokens, "eos_token_ids": eos_token_ids, "temperature": temperature,
              "generator": generator}
    warm = {**kwargs, "max_new_tokens": min(4, max_new_tokens)}
    speculative_generate(runner, drafter, prompts[0], mode=mode, num_draft_tokens=num_draft_tokens, **warm)
    if baseline:
        target_generate(runner, prompts[0], **warm)
    spec_tokens = spec_seconds = base_tokens = base_seconds = 0.0
    draft_seconds = verify_seconds = base_forward_seconds = 0.0
    base_forwards = 0
    identical = 0
    iterator: Iterable = prompts
    if progress:
        from tqdm.auto import tqdm

        iterator = tqdm(prompts, desc="speculative decoding", unit="prompt")
    for prompt in iterator:
        result = speculative_generate(runner, drafter, prompt, mode=mode, num_draft_tokens=num_draft_tokens, **kwargs)
        stats.update(result)
        spec_tokens += len(result.tokens)
        spec_seconds += result.seconds
        draft_seconds += result.draft_seconds
        verify_seconds += result.verify_seconds
        if baseline:
            base = target_generate(runner, prompt, **kwargs)
            base_tokens += len(base.tokens)
            base_seconds += base.seconds
            base_forward_seconds += base.verify_seconds
            base_forwards += base.rounds
            identical += int(base.tokens == result.tokens)
        if progress:
            iterator.set_postfix(tau=f"{stats.accept_length:.2f}")
    spec_tps = spec_tokens / spec_seconds if spec_seconds else 0.0
    base_tps = base_tokens / base_seconds if baseline and base_seconds else None
    report = EvalReport(
        algorithm=algorithm_name(drafter), mode=mode, num_draft_tokens=num_draft_tokens, temperature=temperature,
        prompts=len(prompts), new_tokens=int(spec_tokens), rounds=stats.rounds, accept_length=stats.accept_length,
        position_rates=stats.position_rates, spec_tokens_per_s=spec_tps, baseline_tokens_per_s=base_tps,
        speedup=(spec_tps / base_tps) if base_tps else None,
        identical_outputs=identical if baseline and temperature == 0 else None,
        draft_ms_per_round=1000 * draft_seconds / max(stats.rounds, 1),
        verify_ms_per_round=1000 * verify_seconds / max(stats.rounds, 1),
        baseline_ms_per_forward=1000 * base_forward_seconds / base_forwards if base_forwards else None,
    )
    return report, stats


# --- inputs of the ``evaluate`` subcommand -------------------------------------------------------------------------
def load_exported_draft(module: nn.Module, draft_dir: str) -> None:
    """Put an exported draft directory (SPEC §5 layouts) into a configured module, in place of its draft.

    EAGLE-3 (``module.draft``): ``config.json`` + ``model.safetensors``; a file without ``embed_tokens.weight``
    gets the target's embedding (as vLLM/SGLang share it). Medusa (``module.heads``): vLLM or FasterDecoding layout.
    """
    from pathlib import Path

    path = Path(draft_dir)
    if not path.is_dir():
        raise FileNotFoundError(f"draft directory not found: {path}")
    target = getattr(module, "target", None)
    if target is None:
        raise ValueError(f"{type(module).__name__} has no target loaded (call configure_model() first)")
    cfg = target.config.get_text_config() if hasattr(target.config, "get_text_config") else target.config
    if getattr(module, "draft", None) is not None:
        from safetensors import safe_open

        from spec_lightning.export.eagle3 import load_eagle3_draft

        draft = load_eagle3_draft(path, target_num_hidden_layers=int(cfg.num_hidden_layers))
        with safe_open(str(path / "model.safetensors"), framework="pt") as f:
            has_embedding = "embed_tokens.weight" in f.keys()  # noqa: SIM118 (safe_open has no __contains__)
        if not has_embedding:
            with torch.no_grad():
                draft.embed_tokens.weight.copy_(target.embed_tokens.weight.to(draft.embed_tokens.weight.dtype))
        c = draft.config
        if (c.hidden_size, c.vocab_size) != (int(cfg.hidden_size), int(cfg.vocab_size)):
            raise ValueError(f"{path}: EAGLE-3 draft has hidden_size={c.hidden_size}, vocab_size={c.vocab_size}; the "
                             f"target has {cfg.hidden_size}, {cfg.vocab_size}")
        module.draft = draft.to(target.lm_head.weight.device)
    elif getattr(module, "heads", None) is not None:
        from spec_lightning.export.medusa import load_medusa_heads

        heads = load_medusa_heads(path)
        c = heads.config
        if (c.hidden_size, c.vocab_size) != (int(cfg.hidden_size), int(cfg.vocab_size)):
            raise ValueError(f"{path}: Medusa heads have hidden_size={c.hidden_size}, vocab_size={c.vocab_size}; the "
                             f"target has {cfg.hidden_size}, {cfg.vocab_size}")
        module.heads = heads.to(target.lm_head.weight.device)
    else:
        raise ValueError(f"{type(module).__name__} has neither an EAGLE-3 'draft' nor Medusa 'heads'")


def prompts_from_file(path: str, tokenizer, limit: int | None = None,
                      max_prompt_tokens: int | None = None) -> list[list[int]]:
    """Prompts from a conversation file (JSON/JSONL/parquet/datasets dir; OpenAI or ShareGPT records).

    Each conversation is cut before its first assistant turn (conversations may have none) and rendered with the
    tokenizer's chat template and generation prompt.
    """
    from spec_lightning.datamodules.sources import read_conversations

    read = read_conversations(path, require_assistant=False)
    out: list[list[int]] = []
    for conversation in read.conversations:
        if limit is not None and len(out) >= limit:
            break
        prompt = prompt_from_messages(tokenizer, conversation["messages"])
        if prompt and (max_prompt_tokens is None or len(prompt) <= max_prompt_tokens):
            out.append(prompt)
    if not out:
        bad = f" ({len(read.bad)} unreadable, first: {read.bad[0]})" if read.bad else ""
        raise ValueError(f"{path}: no conversation with a user turn before the first assistant turn{bad}")
    return out
