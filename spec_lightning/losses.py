"""Losses shared by the draft algorithms: shifted labels, step weights, fused chunked (soft) cross-entropy."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor


def shifted_labels(
    input_ids: Tensor, loss_mask: Tensor, attention_mask: Tensor | None, shift: int,
    document_ids: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Labels and validity for predicting token ``t + shift`` at position t.

    Returns ``(labels [B, T] long, valid [B, T] bool)``: ``labels[:, t] = input_ids[:, t + shift]`` and
    ``valid[:, t]`` iff that token is trainable and inside the sequence (and, for packed rows, in the same document
    as position t); the last ``shift`` positions are invalid (label 0).
    """
    if shift < 1:
        raise ValueError(f"shift must be >= 1, got {shift}")
    b, t = input_ids.shape
    keep = loss_mask.bool() if attention_mask is None else loss_mask.bool() & attention_mask.bool()
    labels = torch.zeros_like(input_ids)
    valid = torch.zeros(b, t, dtype=torch.bool, device=input_ids.device)
    if shift < t:
        labels[:, : t - shift] = input_ids[:, shift:]
        valid[:, : t - shift] = keep[:, shift:]
        if attention_mask is not None:  # the predicting position must be a real token too
            valid[:, : t - shift] &= attention_mask[:, : t - shift].bool()
    if document_ids is not None:  # packed rows: never predict across a document boundary
        valid &= same_document(document_ids, shift, t)
    return labels, valid


def same_document(document_ids: Tensor, reach: int, n: int) -> Tensor:
    """bool ``[B, n]``: position t and position ``t + reach`` belong to the same packed document (beyond the row:
    no)."""
    padded = torch.cat([document_ids, document_ids.new_full((document_ids.shape[0], reach), -1)], dim=1)
    return padded[:, :n] == padded[:, reach:reach + n]


def step_weights(num_steps: int, decay: float) -> list[float]:
    """``[decay**0, decay**1, ...]`` (EAGLE-3 / SpecForge use 0.8)."""
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    if not 0.0 < decay <= 1.0:
        raise ValueError(f"step decay must be in (0, 1], got {decay}")
    return [decay**k for k in range(num_steps)]


# --------------------------------------------------------------------------------------------------------------
# fused, chunked linear + cross-entropy (the lm_head's logits are never materialised for all rows)
# --------------------------------------------------------------------------------------------------------------
# Rows per chunk, measured on a 2-core AVX2 CPU (1 thread, N=4096 rows, H=576, C=8192 and 32000, soft and hard
# targets): forward+backward time is flat (within noise) from 256 to 2048 rows and 0-25% below the unfused version,
# while peak memory grows with the chunk (C=32000: 213 MB at 256 rows, 598 MB at 1024, 2.5 GB unfused). The chunk's
# fp32 logits are 256 x C x 4 B (33 MB for C=32000). Liger-Kernel sizes its chunks similarly small
# (about N / ceil(C / H) rows, so that a chunk's logits are about the size of the hidden states).
DEFAULT_CE_CHUNK_SIZE = 256

TargetFn = Callable[[Tensor], Tensor]


class FusedLinearCrossEntropyFunction(torch.autograd.Function):
    """``sum_i row_weights[i] * CE(hidden[i] @ weight.T, target_i)`` chunk by chunk, plus per-row top-k ids.

    Same idea as Liger-Kernel's fused linear cross-entropy: the gradients w.r.t. ``hidden`` and ``weight`` are
    computed during the forward, one chunk of logits at a time, and only they are kept for the backward, which
    scales them by the (scalar) incoming gradient. Not twice differentiable.

    Under autocast (bf16-mixed) the two products per chunk run in the autocast dtype, as autocast would run the
    lm_head, and everything else (logits, softmax, gradients' accumulation) stays fp32.
    """

    @staticmethod
    def forward(ctx, hidden: Tensor, weight: Tensor, row_weights: Tensor, labels: Tensor | None,
                target_probs: Tensor | None, target_index: Tensor | None, target_fn: TargetFn | None, topk: int,
                chunk_size: int, ignore_index: int, need_grad_hidden: bool, need_grad_weight: bool):
        device_type = hidden.device.type
        mm_dtype = torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else None
        with torch.autocast(device_type, enabled=False):
            return FusedLinearCrossEntropyFunction._forward(
                ctx, hidden, weight, row_weights, labels, target_probs, target_index, target_fn, topk, chunk_size,
                ignore_index, need_grad_hidden, need_grad_weight, mm_dtype)

    @staticmethod
    def _forward(ctx, hidden, weight, row_weights, labels, target_probs, target_index, target_fn, topk, chunk_size,
                 ignore_index, need_grad_hidden, need_grad_weight, mm_dtype):
        N, H = hidden.shape
        C = weight.shape[0]
        f32 = torch.promote_types(torch.promote_types(hidden.dtype, weight.dtype), torch.float32)
        mm = mm_dtype or f32  # the products' dtype (autocast's under mixed precision)
        w = weight.to(mm)  # one copy of the lm_head in the products' dtype
        grad_hidden = torch.empty_like(hidden) if need_grad_hidden else None
        grad_weight = torch.zeros(C, H, dtype=f32, device=weight.device) if need_grad_weight else None
        loss = torch.zeros((), dtype=f32, device=hidden.device)
        top = torch.empty(N, topk, dtype=torch.long, device=hidden.device)
        for i0 in range(0, N, chunk_size):
            i1 = min(i0 + chunk_size, N)
            h = hidden[i0:i1].to(mm)
            logits = (h @ w.T).to(f32)  # [n, C] fp32
            top[i0:i1] = logits.topk(topk, dim=-1).indices
            lse = torch.logsumexp(logits, dim=-1)  # [n]
            rw = row_weights[i0:i1].to(f32)
            if labels is not None:  # hard labels: CE = lse - logit[label]; ignore_index rows count 0 (F.cross_entropy)
                lab = labels[i0:i1]
                valid = lab != ignore_index
                safe = torch.where(valid, lab, torch.zeros_like(lab))
                coef = torch.where(valid, rw, torch.zeros_like(rw))
                ce = lse - logits.gather(1, safe[:, None]).squeeze(1)
                loss += (coef * ce).sum()
                if grad_hidden is None and grad_weight is None:
                    continue
                g = logits.sub_(lse[:, None]).exp_().mul_(coef[:, None])  # d loss / d logits, in place
                g.scatter_add_(1, safe[:, None], -coef[:, None])
            else:  # soft targets: CE = -sum_v p(v) log softmax(logits)(v) = sum(p) * lse - p . logits
                if target_fn is not None:
                    rows = target_index[i0:i1] if target_index is not None else torch.arange(i0, i1, device=h.device)
                    p = target_fn(rows).to(f32)
                elif target_index is not None:
                    p = target_probs.index_select(0, target_index[i0:i1]).to(f32)  # gathered per chunk only
                else:
                    p = target_probs[i0:i1].to(f32)
                if p.shape != logits.shape:
                    raise ValueError(f"targets of chunk rows {i0}..{i1} have shape {tuple(p.shape)}, "
                                     f"expected {tuple(logits.shape)}")
                p_sum = p.sum(-1)
                p_dot = torch.bmm(p.unsqueeze(1), logits.unsqueeze(2)).view(-1)  # no [n, C] product tensor
                loss += (rw * (p_sum * lse - p_dot)).sum()
                if grad_hidden is None and grad_weight is None:
                    continue
                # d CE / d logits = softmax * sum(p) - p (exactly F.cross_entropy's, also for unnormalised p)
                g = logits.sub_(lse[:, None]).exp_().mul_((rw * p_sum)[:, None]).addcmul_(p, rw[:, None], value=-1)
            if grad_hidden is not None:
                grad_hidden[i0:i1] = (g.to(mm) @ w).to(hidden.dtype)
            if grad_weight is not None:
                if mm == f32:
                    grad_weight.addmm_(g.T, h)
                else:
                    grad_weight += (g.T.to(mm) @ h).to(f32)
        if grad_weight is not None:
            grad_weight = grad_weight.to(weight.dtype)
        ctx.save_for_backward(grad_hidden, grad_weight)
        ctx.mark_non_differentiable(top)
        return loss, top

    @staticmethod
    def backward(ctx, grad_loss: Tensor, grad_top: Tensor | None):
        grad_hidden, grad_weight = ctx.saved_tensors  # scaled on the device: no host sync to test grad_loss == 1
        grad_hidden = None if grad_hidden is None else grad_hidden * grad_loss.to(grad_hidden.dtype)
        grad_weight = None if grad_weight is None else grad_weight * grad_loss.to(grad_weight.dtype)
        return grad_hidden, grad_weight, *([None] * 10)


def _fused_linear_ce(hidden: Tensor, weight: Tensor, labels: Tensor | None, target_probs: Tensor | None,
                     target_index: Tensor | None, target_fn: TargetFn | None, row_weights: Tensor | None, topk: int,
                     chunk_size: int, ignore_index: int) -> tuple[Tensor, Tensor]:
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(f"hidden must be [N, H] and weight [C, H]; got {tuple(hidden.shape)} and {tuple(weight.shape)}")
    N, C = hidden.shape[0], weight.shape[0]
    if not 0 <= topk <= C:
        raise ValueError(f"topk must be in [0, {C}], got {topk}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}")
    if row_weights is None:
        row_weights = torch.ones(N, device=hidden.device)
    for name, x in (("row_weights", row_weights), ("labels", labels), ("target_index", target_index)):
        if x is not None and tuple(x.shape) != (N,):
            raise ValueError(f"{name} must be [N] = [{N}], got {tuple(x.shape)}")
    if target_probs is not None and (target_probs.dim() != 2 or target_probs.shape[1] != C
                                     or (target_index is None and target_probs.shape[0] != N)):
        raise ValueError(f"target_probs must be [N, C] (or [M, C] with target_index), got {tuple(target_probs.shape)} "
                         f"for N={N}, C={C}")
    grad = torch.is_grad_enabled()
    return FusedLinearCrossEntropyFunction.apply(
        hidden, weight, row_weights.detach(), labels, None if target_probs is None else target_probs.detach(),
        target_index, target_fn, int(topk), int(chunk_size), int(ignore_index), grad and hidden.requires_grad,
        grad and weight.requires_grad)


def fused_linear_soft_cross_entropy(hidden: Tensor, weight: Tensor, target_probs: Tensor | None = None,
                                    target_index: Tensor | None = None, *, target_fn: TargetFn | None = None,
                                    row_weights: Tensor | None = None, topk: int = 1,
                                    chunk_size: int = DEFAULT_CE_CHUNK_SIZE) -> tuple[Tensor, Tensor]:
    """``sum_i row_weights[i] * (-sum_v p_i(v) log softmax(hidden[i] @ weight.T)(v))`` and top-k ids, chunked.

    EAGLE-3's per-step soft CE (SPEC §3.8) without materialising ``[N, C]`` logits: logits exist for
    ``chunk_size`` rows at a time, in fp32 whatever the input dtype.

    Args:
        hidden: ``[N, H]`` rows (fp32 or bf16; the input of the lm_head).
        weight: ``[C, H]`` lm_head weight (no bias).
        target_probs: ``[N, C]`` teacher probabilities, or ``[M, C]`` with ``target_index`` (several TTT steps
            sharing one teacher tensor); gathered per chunk, never copied to ``[N, C]``. Gets no gradient.
        target_index: long ``[N]``: row of ``target_probs`` (or argument of ``target_fn``) for each row.
        target_fn: instead of ``target_probs``: ``rows [n] -> probs [n, C]`` computed on the fly per chunk (e.g. a
            full-vocabulary teacher from another model's hidden states); ``rows`` is ``target_index[chunk]`` or,
            without it, the row numbers of the chunk. Called without gradient.
        row_weights: float ``[N]`` (default ones): ``mask / mask.numel()`` gives SpecForge's ``sum / (B*T)``,
            ``mask / mask.sum()`` the mean over valid rows. Rows of weight 0 may have any finite targets.
        topk: ids per row returned (1: EAGLE accuracy's argmax; 0: none).
    Returns:
        ``(loss, topk_ids)``: fp32 scalar (differentiable w.r.t. hidden and weight, gradients in their dtypes) and
        long ``[N, topk]`` (ids of the largest fp32 logits, in decreasing order).
    """
    if (target_probs is None) == (target_fn is None):
        raise ValueError("pass exactly one of target_probs and target_fn")
    return _fused_linear_ce(hidden, weight, None, target_probs, target_index, target_fn, row_weights, topk, chunk_size,
                            -100)


def fused_linear_cross_entropy(hidden: Tensor, weight: Tensor, labels: Tensor, *, row_weights: Tensor | None = None,
                               topk: int = 1, chunk_size: int = DEFAULT_CE_CHUNK_SIZE,
                               ignore_index: int = -100) -> tuple[Tensor, Tensor]:
    """``sum_i row_weights[i] * F.cross_entropy(hidden[i] @ weight.T, labels[i])`` and top-k ids, chunked.

    Hard-label version (Medusa heads' CE) of ``fused_linear_soft_cross_entropy`` (same arguments, same returns);
    ``labels`` long ``[N]``, rows labelled ``ignore_index`` count 0 as in ``F.cross_entropy``.
    """
    return _fused_linear_ce(hidden, weight, labels, None, None, None, row_weights, topk, chunk_size, ignore_index)
