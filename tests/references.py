"""By-hand references the library's fast paths are checked against (dense TTT attention, unfused soft
cross-entropy, step-decayed sums): obviously correct, memory-hungry, for tests and benchmark baselines only."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from spec_lightning.losses import step_weights

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


def step_decayed_sum(losses: Sequence[Tensor], decay: float) -> Tensor:
    """``sum_k decay**k * losses[k]``."""
    weights = step_weights(len(losses), decay)
    return sum((w * loss for w, loss in zip(weights, losses, strict=True)), start=torch.zeros((), device=losses[0].device))


# --------------------------------------------------------------------------------------------------------------
def step0_mask(T: int, key_mask: Tensor | None = None, document_ids: Tensor | None = None,
               device: torch.device | str | None = None) -> Tensor:
    """bool ``[B or 1, 1, T, T]``: query t may see step-0 key s iff ``s <= t``, key s is not padding and
    (packed rows) ``document_ids[s] == document_ids[t]``."""
    allowed = torch.ones(T, T, dtype=torch.bool, device=device).tril()[None, None]
    if key_mask is not None:
        allowed = allowed & key_mask.bool()[:, None, None, :]
    if document_ids is not None:
        allowed = allowed & (document_ids[:, None, :, None] == document_ids[:, None, None, :])
    return allowed


def ttt_attention_reference(q: Tensor, keys: Sequence[Tensor], values: Sequence[Tensor],
                            key_mask: Tensor | None = None, document_ids: Tensor | None = None) -> Tensor:
    """Dense TTT attention of step ``len(keys) - 1`` (the former ``eagle3.ttt_attention``), scores in fp32.

    q: ``[B, h, T, D]``; keys/values: per step ``[B, h_kv, T, D]`` (step 0 first, current step last; ``h_kv``
    divides ``h``); key_mask: bool/0-1 ``[B, T]`` (False = padding key); document_ids: int ``[B, T]``.
    Returns ``[B, h, T, D]`` in q's dtype. Memory O(B*h*T*T): for tests.
    """
    B, h, T, D = q.shape
    rep = h // keys[0].shape[1]
    dtype = torch.promote_types(q.dtype, torch.float32)
    qf = q.to(dtype) * D**-0.5
    ks = [k.to(dtype).repeat_interleave(rep, dim=1) for k in keys]
    vs = [v.to(dtype).repeat_interleave(rep, dim=1) for v in values]
    s0 = torch.matmul(qf, ks[0].transpose(-1, -2))  # [B, h, T, T]
    s0 = s0.masked_fill(~step0_mask(T, key_mask, document_ids, q.device), torch.finfo(dtype).min)
    if len(ks) == 1:
        return torch.matmul(torch.softmax(s0, dim=-1), vs[0]).to(q.dtype)
    diag = torch.stack([(qf * k).sum(-1) for k in ks[1:]], dim=-1)  # [B, h, T, k]: same-position keys
    p = torch.softmax(torch.cat([s0, diag], dim=-1), dim=-1)  # joint softmax over both parts
    out = torch.matmul(p[..., :T], vs[0]) + (p[..., T:, None] * torch.stack(vs[1:], dim=-2)).sum(-2)
    return out.to(q.dtype)
