"""The decode loops: speculative generation (chain or tree, greedy or sampled) and the plain target baseline.

A *round* is one target forward that verifies ``[root, draft tokens]``, where the root is the last emitted token
(not yet in the target's KV cache). It emits the accepted draft tokens plus the target's own next token, so
acceptance length τ = emitted tokens / rounds. The prefill forward (prompt -> first token) is not a round: it is
counted separately (``prefill_forwards``) and its token is excluded from τ.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import Tensor

from spec_lightning.speculate.drafter import Drafter
from spec_lightning.speculate.sampling import choose, probs, rejection_sample_chain
from spec_lightning.speculate.tree import DraftTree, chain_tree, greedy_accept
from spec_lightning.targets import FrozenTarget, keep_cache_positions

Mode = Literal["chain", "tree"]


@dataclass
class GenerationResult:
    """One generation.

    tokens: the new tokens (prompt excluded), at most ``max_new_tokens``, ending at the first eos if any.
    accepted: per round, the number of draft tokens the target accepted.
    drafted: per round, the draft depth offered (chain length, or tree depth).
    emitted: per round, tokens emitted (accepted + the target's own, clipped at eos / max_new_tokens).
    prefill_forwards: target forwards before the first round (1: the prompt).
    seconds: wall-clock time of the whole generation.
    draft_seconds: time spent in the draft over all rounds (feeding it verified features, proposing).
    verify_seconds: time spent verifying over all rounds (target forward, logits, acceptance, cache pruning); for
        the target-only baseline, the time of its one-token forwards.
    """

    tokens: list[int]
    accepted: list[int] = field(default_factory=list)
    drafted: list[int] = field(default_factory=list)
    emitted: list[int] = field(default_factory=list)
    prefill_forwards: int = 1
    seconds: float = 0.0
    draft_seconds: float = 0.0
    verify_seconds: float = 0.0

    @property
    def rounds(self) -> int:
        """Target forwards after the prefill."""
        return len(self.emitted)

    @property
    def accept_length(self) -> float:
        """τ: tokens emitted per target forward, prefill excluded."""
        return sum(self.emitted) / max(self.rounds, 1)


def _as_ids(prompt_ids: Sequence[int] | Tensor) -> Tensor:
    ids = torch.as_tensor(prompt_ids, dtype=torch.long).reshape(-1).cpu()
    if ids.numel() == 0:
        raise ValueError("prompt_ids is empty; need at least one prompt token")
    return ids


def _check_length(target: FrozenTarget, prompt_len: int, max_new_tokens: int, extra: int) -> None:
    limit = target.max_positions
    if limit is not None and prompt_len + max_new_tokens + extra > limit:
        raise ValueError(f"prompt ({prompt_len} tokens) + max_new_tokens ({max_new_tokens}) + draft ({extra}) exceeds "
                         f"the target's max_position_embeddings ({limit})")


def _clip(new: list[int], room: int, eos: set[int]) -> list[int]:
    """The tokens actually emitted: at most ``room``, up to and including the first eos."""
    out = []
    for t in new[:room]:
        out.append(t)
        if t in eos:
            break
    return out


@torch.no_grad()
def _prefill(target, prompt_ids, max_new_tokens, eos_token_ids, temperature, generator, aux_layer_ids=()):
    """Shared start of speculative and baseline decoding: check, start the clock, prefill, pick the first token."""
    ids = _as_ids(prompt_ids)
    _check_length(target, ids.numel(), max_new_tokens, 0)
    eos = {int(e) for e in eos_token_ids}
    start = time.perf_counter()
    cache = target.new_cache()
    step = target.step(ids, cache, aux_layer_ids=aux_layer_ids)
    first = choose(target.logits(step.hidden[-1]), temperature, generator)
    return ids, eos, start, cache, step, first


def _check_settings(drafter: Drafter, max_new_tokens: int, mode: Mode, num_draft_tokens: int,
                    temperature: float) -> None:
    if mode not in ("chain", "tree"):
        raise ValueError(f"mode must be 'chain' or 'tree', got {mode!r}")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if temperature > 0 and mode == "tree":
        raise ValueError("speculative sampling is implemented for chains; use mode='chain' or temperature=0")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if num_draft_tokens < 0:
        raise ValueError(f"num_draft_tokens must be >= 0, got {num_draft_tokens}")
    if drafter.max_chain is not None and mode == "chain" and num_draft_tokens > drafter.max_chain:
        raise ValueError(f"num_draft_tokens={num_draft_tokens} exceeds what the draft can propose ({drafter.max_chain})")


def _propose(drafter: Drafter, mode: Mode, chain_length: int, max_depth: int, temperature: float,
             generator: torch.Generator | None) -> tuple[DraftTree, Tensor | None]:
    """The round's draft: a chain of ``chain_length`` tokens (with the draft's distributions ``q`` when sampling)
    or the drafter's tree of depth at most ``max_depth``."""
    if mode == "chain":
        draft_tokens, q = drafter.propose_chain(chain_length, temperature, generator)
        return chain_tree(draft_tokens), q
    return drafter.propose_tree(max_depth), None


def _accept(target: FrozenTarget, hidden: Tensor, tree: DraftTree, q: Tensor | None, temperature: float,
            generator: torch.Generator | None) -> tuple[list[int], int]:
    """``(accepted path of tree rows, the target's own next token)`` from the verify forward's ``hidden``."""
    if temperature > 0:
        m, bonus = rejection_sample_chain(tree.tokens, q, probs(target.logits(hidden), temperature), generator)
        return list(range(m)), bonus
    if tree.is_chain:  # a few rows: one lm_head call for all of them
        return greedy_accept(tree, target.logits(hidden).argmax(-1).tolist())
    # a wide tree: the lm_head (V x H, memory-bound) only on the rows of the accepted path
    return greedy_accept(tree, lambda row: int(target.logits(hidden[row:row + 1]).argmax()))


def speculative_generate(
    target: FrozenTarget,
    drafter: Drafter,
    prompt_ids: Sequence[int] | Tensor,
    max_new_tokens: int = 64,
    eos_token_ids: Sequence[int] = (),
    mode: Mode = "chain",
    num_draft_tokens: int = 4,
    temperature: float = 0.0,
    generator: torch.Generator | None = None,
) -> GenerationResult:
    """Lossless speculative decoding with a frozen target and a draft (batch size 1).

    Greedy (``temperature == 0``): the output is token for token the target's own greedy output. Sampling
    (``temperature > 0``, chains only): rejection sampling makes every token distributed as the target's.

    Args:
        target: the frozen target (:class:`~spec_lightning.targets.FrozenTarget`).
        drafter: the draft (:class:`~spec_lightning.speculate.medusa.MedusaDrafter`,
            :class:`~spec_lightning.speculate.eagle3.Eagle3Drafter`).
        prompt_ids: prompt tokens (the chat template already applied).
        max_new_tokens: stop after this many new tokens.
        eos_token_ids: stop after emitting any of these.
        mode: ``"chain"`` (``num_draft_tokens`` tokens) or ``"tree"`` (the drafter's tree settings).
        num_draft_tokens: chain length k.
        temperature: 0 for greedy verification, > 0 for speculative sampling (chains).
        generator: random generator for sampling.
    """
    _check_settings(drafter, max_new_tokens, mode, num_draft_tokens, temperature)
    aux_ids = tuple(drafter.aux_layer_ids)
    target.check_aux_layer_ids(aux_ids)
    ids, eos, start, cache, step, root = _prefill(target, prompt_ids, max_new_tokens, eos_token_ids, temperature,
                                                  generator, aux_ids)
    result = GenerationResult(tokens=[root])
    sequence = ids.tolist() + [root]
    drafter.reset()
    cache_len = ids.numel()  # positions in the target cache; the root is not in it yet
    next_tokens = torch.cat([ids[1:], torch.tensor([root])])
    while len(result.tokens) < max_new_tokens and result.tokens[-1] not in eos:
        round_start = time.perf_counter()
        room = max_new_tokens - len(result.tokens)  # a round emits at most (draft depth + 1) tokens
        drafter.observe(step, next_tokens, sequence)
        tree, q = _propose(drafter, mode, min(num_draft_tokens, room - 1), room - 1, temperature, generator)
        verify_ids = torch.cat([torch.tensor([root]), tree.tokens])
        depths = torch.cat([torch.zeros(1, dtype=torch.long), tree.depths()])
        tree_mask = None if tree.is_chain else tree.verify_mask()
        verify_start = time.perf_counter()
        step = target.step(verify_ids, cache, tree_mask=tree_mask, depths=depths, aux_layer_ids=aux_ids)
        path, bonus = _accept(target, step.hidden, tree, q, temperature, generator)
        # keep the prefix, the root and the accepted path; drop the rejected draft tokens' KV entries
        rows = torch.tensor([0] + [p + 1 for p in path], dtype=torch.long)
        if len(path) < tree.size:
            keep_cache_positions(cache, torch.cat([torch.arange(cache_len), cache_len + rows]))
        cache_len += rows.numel()
        new = [int(tree.tokens[p]) for p in path] + [bonus]
        emitted = _clip(new, room, eos)
        result.tokens += emitted
        result.accepted.append(len(path))
        result.drafted.append(tree.max_depth())
        result.emitted.append(len(emitted))
        sequence += emitted
        step = step.select(rows.to(step.hidden.device))
        next_tokens = torch.tensor(new)
        root = bonus
        round_end = time.perf_counter()
        result.draft_seconds += verify_start - round_start
        result.verify_seconds += round_end - verify_start
    result.seconds = time.perf_counter() - start
    return result


@torch.no_grad()
def target_generate(
    target: FrozenTarget,
    prompt_ids: Sequence[int] | Tensor,
    max_new_tokens: int = 64,
    eos_token_ids: Sequence[int] = (),
    temperature: float = 0.0,
    generator: torch.Generator | None = None,
) -> GenerationResult:
    """The baseline: the target alone, one token per forward, with the same KV cache and code path."""
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    _, eos, start, cache, _, root = _prefill(target, prompt_ids, max_new_tokens, eos_token_ids, temperature,
                                             generator)
    result = GenerationResult(tokens=[root])
    while len(result.tokens) < max_new_tokens and result.tokens[-1] not in eos:
        forward_start = time.perf_counter()
        step = target.step(torch.tensor(result.tokens[-1:]), cache)
        result.tokens.append(choose(target.logits(step.hidden[-1]), temperature, generator))
        result.verify_seconds += time.perf_counter() - forward_start
        result.accepted.append(0)
        result.drafted.append(0)
        result.emitted.append(1)
    result.seconds = time.perf_counter() - start
    return result


__all__ = ["DraftTree", "GenerationResult", "speculative_generate", "target_generate"]
