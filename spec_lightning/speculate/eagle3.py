"""EAGLE-3 drafting at decode time: the draft's own layer code over a KV cache, chains and dynamic trees (SPEC §3).

Draft position p combines target features of token p (``fc(aux)`` for verified tokens, the draft's own **un-normed**
output h for drafted ones) with the embedding of token p+1, at RoPE position p, and predicts token p+2 — the
inference view of the TTT loop of SPEC §3.7: chain step j at position t attends to the verified (step-0) keys up to t
and to the keys of its own earlier steps, which here are simply the cached positions t+1..t+j-1 of the chain.
Verified positions stay in the draft cache; drafted ones are dropped after every round.

Every forward goes through :meth:`~spec_lightning.drafts.eagle3.Eagle3Draft.layers_step` with
:class:`~spec_lightning.drafts.eagle3.KVCache` caches: the same layer code that training runs.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from spec_lightning.drafts.eagle3 import Eagle3Draft
from spec_lightning.speculate.sampling import draw_chain
from spec_lightning.speculate.tree import (
    DraftTree,
    build_dynamic_tree,
    check_tree_settings,
    frontier_visibility,
)
from spec_lightning.targets import TargetStep


class Eagle3Drafter:
    """Drafts with an :class:`~spec_lightning.drafts.eagle3.Eagle3Draft`.

    Args:
        draft: the trained draft network (its ``embed_tokens`` must hold the target's embedding).
        tree_topk: EAGLE-2 branching: frontier nodes expanded per depth and children per expanded node.
        tree_depth: maximum tree depth (draft tokens on the longest branch).
        tree_total_tokens: draft tokens kept in the verified tree.
    """

    def __init__(self, draft: Eagle3Draft, tree_topk: int = 4, tree_depth: int = 5, tree_total_tokens: int = 24) -> None:
        check_tree_settings(tree_topk, tree_depth, tree_total_tokens)
        self.draft = draft
        self.model: nn.Module = draft
        self.aux_layer_ids = tuple(draft.config.aux_layer_ids)
        self.max_chain: int | None = None
        self.tree_topk, self.tree_depth, self.tree_total_tokens = tree_topk, tree_depth, tree_total_tokens
        self.reset()

    # --- state --------------------------------------------------------------------------------------------------
    def reset(self) -> None:
        self.caches = self.draft.new_kv_caches()
        self.real_length = 0  # verified positions in the draft cache
        self.last_h: Tensor | None = None  # [H] un-normed output at the last verified position
        self.last_logits: Tensor | None = None  # [Vd] its logits (predict the token after the last emitted one)
        self.sequence: list[int] = []

    @property
    def _dtype(self) -> torch.dtype:
        return self.draft.fc.weight.dtype

    @property
    def _device(self) -> torch.device:
        return self.draft.fc.weight.device

    @property
    def cached(self) -> int:
        return self.caches[0].length

    def truncate(self, length: int) -> None:
        for cache in self.caches:
            cache.truncate(length)

    # --- the network ----------------------------------------------------------------------------------------------
    @torch.no_grad()
    def run(self, h: Tensor, tokens: Tensor, positions: Tensor, allowed: Tensor) -> tuple[Tensor, Tensor]:
        """The draft's layers on n new positions (appended to the cache): ``(next-step input h, lm_head input)``,
        each ``[n, H]`` (:meth:`~spec_lightning.drafts.eagle3.Eagle3Draft.advance`).

        h: ``[n, H]`` input hidden (``fc(aux)`` or an earlier draft output); tokens: ``[n]`` the token embedded at
        each position; positions: ``[n]`` RoPE positions; allowed: bool ``[n, S + n]`` which cached (S) and new
        positions each query sees.
        """
        for cache in self.caches:
            cache.mask = allowed
        out = self.draft.layers_step(h[None], tokens.to(self._device)[None], positions.to(self._device)[None],
                                     self.caches)
        feed, head = self.draft.advance(out[0])
        return feed, head

    @torch.no_grad()
    def draft_logits(self, h: Tensor) -> Tensor:
        """``[n, Vd]`` float logits for lm_head inputs ``h [n, H]``."""
        return self.draft.logits(h).float()

    def to_target(self, draft_ids: Tensor) -> Tensor:
        """Target ids of draft-vocabulary ids (SPEC §3.4)."""
        return self.draft.draft_to_target(draft_ids.to(self.draft.d2t.device)).cpu()

    def _causal(self, n: int) -> Tensor:
        s = self.cached
        return torch.ones(n, s + n, dtype=torch.bool).tril(diagonal=s)

    # --- Drafter protocol -------------------------------------------------------------------------------------------
    @torch.no_grad()
    def observe(self, step: TargetStep, next_tokens: Tensor, sequence: list[int]) -> None:
        if step.aux is None:
            raise ValueError("EAGLE-3 drafting needs the target's aux hidden states (aux_layer_ids)")
        self.truncate(self.real_length)  # drop the previous round's drafted positions
        n = step.aux.shape[0]
        h = self.draft.project(step.aux.to(device=self._device, dtype=self._dtype))  # [n, H]
        positions = torch.arange(self.real_length, self.real_length + n)
        feed, head = self.run(h, next_tokens, positions, self._causal(n))
        self.real_length += n
        self.sequence = sequence
        self.last_h = feed[-1]
        self.last_logits = self.draft_logits(head[-1:])[0]

    def _target_q(self, q_draft: Tensor) -> Tensor:
        """A draft-vocabulary distribution ``[Vd]`` as a target-vocabulary one ``[V]``."""
        ids = self.to_target(torch.arange(q_draft.shape[-1])).to(q_draft.device)
        return torch.zeros(self.draft.config.vocab_size, dtype=q_draft.dtype, device=q_draft.device).index_add_(
            0, ids, q_draft)

    @torch.no_grad()
    def propose_chain(self, k: int, temperature: float = 0.0,
                      generator: torch.Generator | None = None) -> tuple[Tensor, Tensor | None]:
        assert self.last_logits is not None, "observe() must run before drafting"
        h = self.last_h

        def advance(tokens: list[int], j: int) -> Tensor:
            nonlocal h
            position = torch.tensor([self.real_length + j])  # draft token j+1 is embedded at position R + j
            feed, head = self.run(h[None], torch.tensor([tokens[-1]]), position, self._causal(1))
            h = feed[0]
            return self.draft_logits(head)[0]

        chain = draw_chain(self.last_logits, k, temperature, generator, advance,
                           token_id=lambda index: int(self.to_target(index)[0]), target_q=self._target_q)
        self.truncate(self.real_length)
        return chain

    @torch.no_grad()
    def propose_tree(self, max_depth: int) -> DraftTree:
        assert self.last_logits is not None and self.last_h is not None, "observe() must run before drafting"
        R = self.real_length
        slot: dict[int, int] = {}  # expanded node -> its draft cache position
        out_h: dict[int, Tensor] = {-1: self.last_h}

        def expand(frontier: list[int], tokens: list[int], parents: list[int]) -> Tensor:
            allowed, depth = frontier_visibility(frontier, parents, slot, R, self.cached)
            h_in = torch.stack([out_h[parents[c]] for c in frontier])
            position = torch.full((len(frontier),), R + depth - 1, dtype=torch.long)  # a depth-d node sits at position R + d - 1
            feed, head = self.run(h_in, torch.tensor([tokens[c] for c in frontier]), position, allowed)
            for i, c in enumerate(frontier):
                out_h[c] = feed[i]
            return self.draft_logits(head)

        tree = build_dynamic_tree(self.last_logits, expand, self.to_target, self.tree_topk,
                                  min(self.tree_depth, max_depth), self.tree_total_tokens)
        self.truncate(R)
        return tree
