"""What the decode loop asks of a draft (``Drafter``), independent of the algorithm."""

from __future__ import annotations

from typing import Protocol

import torch
from torch import Tensor, nn

from spec_lightning.speculate.tree import DraftTree
from spec_lightning.targets import TargetStep


class Drafter(Protocol):
    """A draft model bound to one generation at a time (batch size 1).

    Attributes:
        aux_layer_ids: target decoder layers whose outputs :meth:`observe` needs (empty for Medusa).
        max_chain: longest chain the draft can propose (Medusa: its number of heads; EAGLE: unbounded).
        model: the draft's weights (opt-in CPU kernels are applied to them from outside the loop).
    """

    aux_layer_ids: tuple[int, ...]
    max_chain: int | None
    model: nn.Module

    def reset(self) -> None:
        """Forget the previous generation."""

    def observe(self, step: TargetStep, next_tokens: Tensor, sequence: list[int]) -> None:
        """Target features of newly verified positions (``step``, n rows) and the token after each (``[n]``).

        ``sequence`` is every token so far (prompt + emitted), its last element being ``next_tokens[-1]``.
        """

    def propose_chain(self, k: int, temperature: float = 0.0,
                      generator: torch.Generator | None = None) -> tuple[Tensor, Tensor | None]:
        """``k`` draft tokens after ``sequence`` and, when sampling (T > 0), their distributions ``[k, V]``."""

    def propose_tree(self, max_depth: int) -> DraftTree:
        """A greedy draft tree of depth at most ``max_depth``."""
