"""Losses shared by the draft algorithms: soft cross-entropy against a teacher distribution, step-decayed sums."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

LossNormalization = Literal["all_positions", "valid_positions"]


def soft_cross_entropy(logits: Tensor, target_p: Tensor, mask: Tensor,
                       normalization: LossNormalization = "all_positions", num_positions: int | None = None) -> Tensor:
    """``-sum_v p(v) log softmax(logits)(v)`` averaged over positions (SPEC §3.8).

    Args:
        logits: ``[..., C]`` student logits.
        target_p: ``[..., C]`` teacher probabilities (rows at masked positions are ignored, may be anything finite).
        mask: ``[...]`` 0/1 or bool: which positions count.
        normalization: ``"all_positions"`` divides by the number of positions, masked or not (SpecForge's
            ``sum / (B*T)``); ``"valid_positions"`` divides by the number of counted positions (0 if none).
        num_positions: the "all positions" count when ``logits`` is a slice of a larger grid (default
            ``mask.numel()``).
    """
    if logits.shape != target_p.shape or logits.shape[:-1] != mask.shape:
        raise ValueError(f"shapes do not fit: logits {tuple(logits.shape)}, target_p {tuple(target_p.shape)}, "
                         f"mask {tuple(mask.shape)}")
    dtype = torch.promote_types(logits.dtype, torch.float32)  # at least fp32 (bf16 logits under autocast)
    logp = F.log_softmax(logits.to(dtype), dim=-1)
    per_position = -(target_p.to(dtype) * logp).sum(-1)
    mask = mask.bool()
    total = torch.where(mask, per_position, torch.zeros_like(per_position)).sum()
    if normalization == "all_positions":
        return total / (mask.numel() if num_positions is None else num_positions)
    if normalization == "valid_positions":
        return total / mask.sum().clamp(min=1)
    raise ValueError(f"normalization must be 'all_positions' or 'valid_positions', got {normalization!r}")


def step_weights(num_steps: int, decay: float) -> list[float]:
    """``[decay**0, decay**1, ...]`` (EAGLE-3 / SpecForge use 0.8)."""
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    if not 0.0 < decay <= 1.0:
        raise ValueError(f"step decay must be in (0, 1], got {decay}")
    return [decay**k for k in range(num_steps)]


def step_decayed_sum(losses: Sequence[Tensor], decay: float) -> Tensor:
    """``sum_k decay**k * losses[k]``."""
    weights = step_weights(len(losses), decay)
    return sum((w * loss for w, loss in zip(weights, losses, strict=True)), start=torch.zeros((), device=losses[0].device))
