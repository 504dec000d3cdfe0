"""Drafters whose one forward scores every draft position at once: Medusa's heads, a DFlash block.

Slot j's logits do not depend on the tokens drafted at slots < j, so a chain is each slot's argmax (sampling: one
draw from each slot's ``softmax(logits / T)``, every q known before its token is drawn, as the lossless verification
needs) and a tree is each slot's top-k laid out by a list of choices (Medusa notation, ``speculate.tree``).
"""

from __future__ import annotations

import torch
from torch import Tensor

from spec_lightning.speculate.sampling import probs
from spec_lightning.speculate.tree import DraftTree, tree_from_choices


class SlotDrafter:
    """``propose_chain``/``propose_tree`` of the :class:`~spec_lightning.speculate.drafter.Drafter` protocol for
    one-forward drafters. Subclasses set ``max_chain``, ``tree_choices`` (validated) and ``tree_topk`` and implement
    :meth:`slot_logits` and :meth:`chain_limit`."""

    max_chain: int
    tree_choices: list[tuple[int, ...]]
    tree_topk: int

    def slot_logits(self, k: int) -> Tensor:  # pragma: no cover - abstract
        """Float logits ``[>= k, V]`` whose row j scores the token j + 1 places after the last verified one."""
        raise NotImplementedError

    def chain_limit(self) -> str:  # pragma: no cover - abstract
        """The start of the error for a chain longer than ``max_chain`` (``... , asked for k`` follows)."""
        raise NotImplementedError

    def propose_chain(self, k: int, temperature: float = 0.0,
                      generator: torch.Generator | None = None) -> tuple[Tensor, Tensor | None]:
        if not 0 <= k <= self.max_chain:
            raise ValueError(f"{self.chain_limit()}, asked for {k}")
        if k == 0:
            return torch.zeros(0, dtype=torch.long), None
        logits = self.slot_logits(k)[:k]
        if temperature == 0:
            return logits.argmax(-1).cpu(), None
        q = probs(logits, temperature)
        return torch.multinomial(q, 1, generator=generator)[:, 0].cpu(), q

    def propose_tree(self, max_depth: int) -> DraftTree:
        choices = [c for c in self.tree_choices if len(c) <= max_depth]
        if not choices:
            return DraftTree(torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.long))
        logits = self.slot_logits(max(len(c) for c in choices))
        topk = logits.topk(min(self.tree_topk, logits.shape[-1]), dim=-1).indices.cpu()  # [slots, topk]
        return tree_from_choices(choices, topk)
