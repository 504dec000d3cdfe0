"""torchmetrics shared by the algorithms: accuracy per draft position (TTT step or Medusa head)."""

from __future__ import annotations

import torch
from torch import Tensor
from torchmetrics import Metric


class PositionAccuracy(Metric):
    """Fraction of valid positions that are correct, separately for each of ``num_positions`` draft positions.

    Counters are integers summed across ranks, so the result is exact under DDP.
    ``update(correct, valid)`` takes boolean tensors of shape ``[P, ...]`` (P = ``num_positions``).
    """

    full_state_update = False
    higher_is_better = True

    def __init__(self, num_positions: int, **kwargs) -> None:
        super().__init__(**kwargs)
        if num_positions < 1:
            raise ValueError(f"num_positions must be >= 1, got {num_positions}")
        self.num_positions = num_positions
        self.add_state("correct", default=torch.zeros(num_positions, dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("total", default=torch.zeros(num_positions, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, correct: Tensor, valid: Tensor) -> None:
        if correct.shape != valid.shape or correct.shape[0] != self.num_positions:
            raise ValueError(
                f"expected correct and valid of equal shape [{self.num_positions}, ...], "
                f"got {tuple(correct.shape)} and {tuple(valid.shape)}"
            )
        valid = valid.bool()
        self.correct += (correct.bool() & valid).flatten(1).sum(1)
        self.total += valid.flatten(1).sum(1)

    def compute(self) -> Tensor:
        return self.correct.float() / self.total.clamp(min=1).float()
