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


class AcceptanceCounts(Metric):
    """Integer counts of lossless speculative decoding, summed across ranks: rounds, emitted tokens, and per draft
    position j the rounds that offered it and the rounds that accepted it (τ = emitted / rounds).

    ``update(accepted, drafted, emitted)`` takes per-round lists (a generation's ``GenerationResult`` fields);
    positions beyond ``max_positions`` are not counted.
    """

    full_state_update = False

    def __init__(self, max_positions: int = 64, **kwargs) -> None:
        super().__init__(**kwargs)
        self.max_positions = max_positions
        self.add_state("rounds", default=torch.zeros((), dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("emitted", default=torch.zeros((), dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("accepted_at", default=torch.zeros(max_positions, dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("drafted_at", default=torch.zeros(max_positions, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, accepted: list[int], drafted: list[int], emitted: list[int]) -> None:
        positions = torch.arange(self.max_positions, device=self.rounds.device)
        for a, d, e in zip(accepted, drafted, emitted, strict=True):
            self.rounds += 1
            self.emitted += int(e)
            self.drafted_at += (positions < d).long()
            self.accepted_at += (positions < a).long()

    def compute(self) -> dict[str, Tensor]:
        """τ (``accept_length``), ``position_rates`` and the summed counts, over the positions ever offered."""
        depth = int((self.drafted_at > 0).sum())
        rates = self.accepted_at[:depth].float() / self.drafted_at[:depth].clamp(min=1).float()
        tau = self.emitted.float() / self.rounds.clamp(min=1).float()
        return {"accept_length": tau, "position_rates": rates, "rounds": self.rounds.clone(),
                "emitted": self.emitted.clone(), "accepted_at": self.accepted_at[:depth].clone(),
                "drafted_at": self.drafted_at[:depth].clone()}
