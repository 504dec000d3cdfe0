"""Teachers from the target's real output distribution, computed in chunks of rows.

The target's logits come from its final post-norm hidden states through ``FrozenTarget.logits`` (lm_head plus the
family's post-processing), ``chunk_size`` rows at a time: full-vocabulary logits for all positions never exist at
once (a 2048 x 128k fp32 teacher alone is 1 GB per sample).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

LogitsFn = Callable[[Tensor], Tensor]
DEFAULT_TEACHER_CHUNK = 256


@torch.no_grad()
def draft_vocab_teacher(logits_fn: LogitsFn, hidden: Tensor, vocab_rows: Tensor | None,
                        chunk_size: int = DEFAULT_TEACHER_CHUNK, temperature: float = 1.0) -> tuple[Tensor, Tensor]:
    """EAGLE-3's teacher (SPEC §3.5) for ``N`` rows of final hidden states ``[N, H]``.

    Returns ``(probs [N, Vd] float32, argmax [N] long)``: ``softmax(logits[:, vocab_rows] / temperature)``
    (renormalised over the draft vocabulary; the full vocabulary when ``vocab_rows`` is None; ``temperature`` 1 is
    SpecForge's teacher, below 1 sharpens it toward the argmax) and the full-vocabulary argmax (a miss when it is
    outside the draft vocabulary).
    """
    if temperature <= 0:
        raise ValueError(f"teacher temperature must be > 0, got {temperature}")
    n = hidden.shape[0]
    width = None if vocab_rows is None else vocab_rows.numel()
    probs: Tensor | None = None
    argmax = torch.empty(n, dtype=torch.long, device=hidden.device)
    for i0 in range(0, n, chunk_size):
        i1 = min(i0 + chunk_size, n)
        logits = logits_fn(hidden[i0:i1]).float()  # [c, V]
        argmax[i0:i1] = logits.argmax(-1)
        sub = logits if vocab_rows is None else logits.index_select(-1, vocab_rows)
        if probs is None:
            probs = torch.empty(n, width or sub.shape[-1], dtype=torch.float32, device=hidden.device)
        probs[i0:i1] = torch.softmax(sub if temperature == 1.0 else sub / temperature, dim=-1)
    if probs is None:
        probs = torch.empty(0, width or 0, dtype=torch.float32, device=hidden.device)
    return probs, argmax


def distribution_fn(logits_fn: LogitsFn, hidden: Tensor, temperature: float = 1.0,
                    argmax_out: Tensor | None = None) -> Callable[[Tensor], Tensor]:
    """``rows -> softmax(logits(hidden[rows]) / T)`` computed on demand (a full-vocabulary distillation teacher for
    the fused loss's ``target_fn``: only ``chunk`` rows of teacher probabilities exist at a time). With
    ``argmax_out`` (long ``[N]``) the teacher's argmax of every row it computes is written there too."""
    if temperature <= 0:
        raise ValueError(f"teacher temperature must be > 0, got {temperature}")

    @torch.no_grad()
    def fn(rows: Tensor) -> Tensor:
        logits = logits_fn(hidden.index_select(0, rows)).float()
        if argmax_out is not None:
            argmax_out[rows] = logits.argmax(-1)
        return torch.softmax(logits / temperature, dim=-1)

    return fn
