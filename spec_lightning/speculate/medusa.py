"""Medusa drafting (Cai et al., 2024; SPEC §4): the heads read the target's last post-norm hidden state.

The base lm_head at the last verified position p gives the root token (p+1); head h gives token p+2+h. A chain
takes each head's top-1 (or a draw at T > 0); a tree takes per-head top-k candidates laid out by a sparse list
of choices (:data:`~spec_lightning.speculate.tree.DEFAULT_MEDUSA_CHOICES`); both in ``speculate.slots``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from spec_lightning.drafts.medusa import MedusaHeads
from spec_lightning.speculate.slots import SlotDrafter
from spec_lightning.speculate.tree import DEFAULT_MEDUSA_CHOICES, validate_choices
from spec_lightning.targets import TargetStep


class MedusaDrafter(SlotDrafter):
    """Drafts from :class:`~spec_lightning.drafts.medusa.MedusaHeads`.

    Args:
        heads: the trained heads (any dtype/device; features are cast to them).
        tree_choices: the sparse tree used by :meth:`propose_tree` (tuples of per-depth top-k ranks).
    """

    aux_layer_ids: tuple[int, ...] = ()

    def __init__(self, heads: MedusaHeads, tree_choices: Sequence[Sequence[int]] | None = None) -> None:
        self.heads = heads
        self.model: nn.Module = heads
        self.num_heads = heads.config.num_heads
        self.max_chain = self.num_heads
        choices = DEFAULT_MEDUSA_CHOICES if tree_choices is None else tree_choices
        choices = [c for c in choices if len(c) <= self.num_heads] if tree_choices is None else choices
        self.tree_choices = validate_choices(choices, self.num_heads)
        self.tree_topk = 1 + max(max(c) for c in self.tree_choices)
        self.hidden: Tensor | None = None
        self.sequence: list[int] = []

    def reset(self) -> None:
        self.hidden, self.sequence = None, []

    def observe(self, step: TargetStep, next_tokens: Tensor, sequence: list[int]) -> None:
        self.hidden = step.hidden[-1]
        self.sequence = sequence

    @torch.no_grad()
    def head_logits(self) -> Tensor:
        """``[K, V]`` logits of every head at the last verified position (overridable, e.g. by test oracles)."""
        assert self.hidden is not None, "observe() must run before drafting"
        w = self.heads.lm_heads[0].weight
        return self.heads(self.hidden.to(device=w.device, dtype=w.dtype)[None, None])[:, 0, 0].float()

    def slot_logits(self, k: int) -> Tensor:
        return self.head_logits()  # one forward scores every head, whatever k

    def chain_limit(self) -> str:
        return f"a Medusa chain has at most num_heads={self.num_heads} tokens"
