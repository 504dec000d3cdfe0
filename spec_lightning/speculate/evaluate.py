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
from spec_lightning.targets import FrozenTarget


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
    identical_outputs: int | None  # prompts whose greedy output equals HF generate's (None when not compared)
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
            rows.append(("outputs identical to HF generate (greedy)", f"{self.identical_outputs}/{self.prompts}"))
        width = max(len(r[0]) for r in rows)
        return "\n".join(f"{name:<{width}}  {value}" for name, value in rows)


def eos_token_ids(model: nn.Module, tokenizer=None) -> list[int]:
    """Stop tokens: the model's generation config and config ``eos_token_id`` (int or list) and the tokenizer's."""
    if isinstance(model, FrozenTarget):
        model = model.model
    ids: list[int] = []
    for source in (getattr(model, "generation_config", None), getattr(model, "config", None), tokenizer):
        value = getattr(source, "eos_token_id", None) if source is not None else None
        for i in value if isinstance(value, (list, tuple)) else [value]:
            if i is not None and int(i) not in ids:
                ids.append(int(i))
    return ids


@torch.no_grad()
def hf_greedy(target: FrozenTarget, prompt: Sequence[int], max_new_tokens: int, eos_token_ids: Sequence[int]) -> list[int]:
    """The target's own greedy continuation by transformers' ``generate`` (the lossless reference: it shares no code
    with our decode loop or our logits path)."""
    model = target.model
    ids = torch.tensor([list(prompt)], device=target.device)
    eos = list(eos_token_ids) or None
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens, do_sample=False,
                         eos_token_id=eos, pad_token_id=eos[0] if eos else None, top_p=None, top_k=None,
                         temperature=None)
    return out[0, ids.shape[1]:].tolist()


def evaluate_acceptance(
    target: FrozenTarget,
    drafter: Drafter,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int = 64,
    eos_token_ids: Sequence[int] = (),
    mode: Mode = "chain",
    num_draft_tokens: int = 4,
    temperature: float = 0.0,
    baseline: bool = True,
    check_lossless: bool = True,
    seed: int = 0,
    progress: bool = False,
    algorithm: str = "",
) -> tuple[EvalReport, AcceptanceStats]:
    """Decode every prompt speculatively (and with the target alone when ``baseline``) and summarise.

    Speculative and baseline runs alternate prompt by prompt, after one untimed warm-up of each, so load changes
    on a shared machine hit both alike. With ``check_lossless`` (greedy only) every speculative output is compared
    with transformers' own greedy ``generate`` of the target (untimed).
    """
    if not prompts:
        raise ValueError("no prompts to evaluate (empty prompt list)")
    stats = AcceptanceStats()
    generator = torch.Generator(device=target.device).manual_seed(seed)
    kwargs = {"max_new_tokens": max_new_tokens, "eos_token_ids": eos_token_ids, "temperature": temperature,
              "generator": generator}
    warm = {**kwargs, "max_new_tokens": min(4, max_new_tokens)}
    speculative_generate(target, drafter, prompts[0], mode=mode, num_draft_tokens=num_draft_tokens, **warm)
    if baseline:
        target_generate(target, prompts[0], **warm)
    compare = check_lossless and temperature == 0
    spec_tokens = spec_seconds = base_tokens = base_seconds = 0.0
    draft_seconds = verify_seconds = base_forward_seconds = 0.0
    base_forwards = 0
    identical = 0
    iterator: Iterable = prompts
    if progress:
        from tqdm.auto import tqdm

        iterator = tqdm(prompts, desc="speculative decoding", unit="prompt")
    for prompt in iterator:
        result = speculative_generate(target, drafter, prompt, mode=mode, num_draft_tokens=num_draft_tokens, **kwargs)
        stats.update(result)
        spec_tokens += len(result.tokens)
        spec_seconds += result.seconds
        draft_seconds += result.draft_seconds
        verify_seconds += result.verify_seconds
        if baseline:
            base = target_generate(target, prompt, **kwargs)
            base_tokens += len(base.tokens)
            base_seconds += base.seconds
            base_forward_seconds += base.verify_seconds
            base_forwards += base.rounds
        if compare:
            identical += int(hf_greedy(target, prompt, max_new_tokens, eos_token_ids) == result.tokens)
        if progress:
            iterator.set_postfix(tau=f"{stats.accept_length:.2f}")
    spec_tps = spec_tokens / spec_seconds if spec_seconds else 0.0
    base_tps = base_tokens / base_seconds if baseline and base_seconds else None
    report = EvalReport(
        algorithm=algorithm or type(drafter).__name__, mode=mode, num_draft_tokens=num_draft_tokens,
        temperature=temperature, prompts=len(prompts), new_tokens=int(spec_tokens), rounds=stats.rounds,
        accept_length=stats.accept_length, position_rates=stats.position_rates, spec_tokens_per_s=spec_tps,
        baseline_tokens_per_s=base_tps, speedup=(spec_tps / base_tps) if base_tps else None,
        identical_outputs=identical if compare else None,
        draft_ms_per_round=1000 * draft_seconds / max(stats.rounds, 1),
        verify_ms_per_round=1000 * verify_seconds / max(stats.rounds, 1),
        baseline_ms_per_forward=1000 * base_forward_seconds / base_forwards if base_forwards else None,
    )
    return report, stats
