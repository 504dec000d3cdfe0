"""Token choice and lossless speculative sampling (Leviathan et al., 2023; Chen et al., 2023).

Chain verification at temperature T > 0: draft token ``d_j ~ q_j`` is accepted with probability
``min(1, p_j(d_j) / q_j(d_j))``; at the first rejection the token is resampled from the residual
``norm(max(0, p_j - q_j))`` and the round ends; if all k are accepted, one more token is drawn from ``p_{k+1}``.
Every emitted token is then distributed exactly as the target's own sampling (same algorithm as gpt-fast's
``speculative_decode``). ``q_j`` may depend on anything known before ``d_j`` is drawn (EAGLE: the earlier draft
tokens; Medusa: only the verified prefix).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor


def probs(logits: Tensor, temperature: float) -> Tensor:
    """``softmax(logits / T)`` in float32 (``T > 0``)."""
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0 for sampling, got {temperature}")
    return torch.softmax(logits.float() / temperature, dim=-1)


def sample(p: Tensor, generator: torch.Generator | None = None) -> int:
    """One draw from a probability vector ``[V]``."""
    return int(torch.multinomial(p, 1, generator=generator))


def choose(logits: Tensor, temperature: float, generator: torch.Generator | None = None) -> int:
    """The target's own choice: argmax at ``T == 0``, else a draw from ``softmax(logits / T)``."""
    if temperature == 0:
        return int(logits.argmax())
    return sample(probs(logits, temperature), generator)


def draw(logits: Tensor, temperature: float, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor | None]:
    """A draft's next token: ``(index [1], None)`` greedily at T = 0, else ``(a draw, its distribution q)``."""
    if temperature == 0:
        return logits.argmax()[None], None
    q = probs(logits, temperature)
    return torch.multinomial(q, 1, generator=generator), q


def draw_chain(logits: Tensor, k: int, temperature: float, generator: torch.Generator | None,
               advance: Callable[[list[int], int], Tensor], token_id: Callable[[Tensor], int] = int,
               target_q: Callable[[Tensor], Tensor] = lambda q: q) -> tuple[Tensor, Tensor | None]:
    """The chain loop of every autoregressive draft: ``k`` tokens, each drawn from ``logits`` (:func:`draw`).

    After token ``j`` (unless it is the last), ``advance(tokens so far, j)`` feeds it to the draft and returns the
    next logits. ``token_id`` maps a drawn index to a target token id and ``target_q`` a distribution to the
    target's vocabulary (identity unless the draft has its own vocabulary, as EAGLE-3's). Returns the tokens ``[k]``
    and, when sampling, their distributions ``[k, V]``.
    """
    tokens: list[int] = []
    qs: list[Tensor] = []
    for j in range(k):
        index, q = draw(logits, temperature, generator)
        if q is not None:
            qs.append(target_q(q))
        tokens.append(token_id(index))
        if j < k - 1:
            logits = advance(tokens, j)
    return torch.tensor(tokens, dtype=torch.long), (torch.stack(qs) if qs else None)


def rejection_sample_chain(draft_tokens: Tensor, q: Tensor, p: Tensor,
                           generator: torch.Generator | None = None) -> tuple[int, int]:
    """Verify a sampled chain.

    draft_tokens: ``[k]``; q: ``[k, V]`` the distributions they were drawn from; p: ``[k + 1, V]`` the target's
    distributions at the rows ``[root, d_1, ..., d_k]``. Returns ``(number of accepted draft tokens m,
    next token)``: the residual draw at the first rejection, or a draw from ``p[k]`` when all are accepted.
    """
    k = draft_tokens.shape[0]
    device = p.device
    for j in range(k):
        x = int(draft_tokens[j])
        px, qx = float(p[j, x]), float(q[j, x])
        u = float(torch.rand((), generator=generator, device=generator.device if generator is not None else device))
        if qx > 0 and u * qx < px:  # u < min(1, p/q), without dividing
            continue
        residual = (p[j] - q[j].to(p.dtype)).clamp(min=0)
        total = float(residual.sum())
        if total <= 0:  # p <= q everywhere yet x rejected: only possible through rounding; fall back to p
            residual, total = p[j], float(p[j].sum())
        return j, sample(residual / total, generator)
    return k, sample(p[k], generator)
