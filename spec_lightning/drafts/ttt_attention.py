"""EAGLE-3 training-time-test (TTT) attention with memory linear in T (SPEC §3.7). Plain PyTorch, no Lightning.

Pattern: a query at TTT step k, position t attends to the step-0 keys at positions ``s <= t`` (causal; padding keys
and, for packed rows, keys of other documents excluded) and to the keys of steps 1..k at the *same* position t only,
with one softmax over both parts (SpecForge's eager Eagle3 attention).

The dense, obviously-correct version (a ``[B, h, T, T]`` score matrix) is ``tests/references.py``'s
``ttt_attention_reference``. ``ttt_attention`` computes the same numbers flash-attention style: query blocks, step-0 key tiles only up to
the block's end (causal: about half the FLOPs of the dense product), an online softmax in fp32, and a backward that
recomputes the scores blockwise from the saved log-sum-exp. Autograd keeps only q, keys, values, the output and the
fp32 log-sum-exp ``[B, h, T]``; the largest transient is a ``[B, h, block_size, key_block_size]`` fp32 score tile
(plus fp32 ``[B, h, T, D]`` copies/gradient buffers, linear in T).

Fully-masked query rows (no visible step-0 key, e.g. a row that is padding from its start) reproduce what the dense
``masked_fill(finfo.min)`` + softmax gives: at step 0 every score of the row is the same constant, so the softmax is
uniform over *all* T step-0 keys (the output is the mean of the step-0 values, no gradient to q or the keys); at
step k >= 1 the finite diagonal scores win and the row attends only to the keys of steps 1..k. No NaN either way.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

# Chosen with benchmarks/ttt_attention_speed.py on a 2-core AVX2 CPU (1 thread, h=9, h_kv=3, D=64, T=1024/4096,
# 1 and 5 TTT steps): 128 queries x 256 keys was the fastest or within noise of it everywhere. Tiling the keys too
# (online softmax) beats one tile per query block's whole causal range by ~30% at T=4096 (the [h, 128, 256] fp32
# score tile, 1.2 MB, stays in cache) and bounds the transient at O(B*h*block*key_block) instead of O(B*h*block*T).
DEFAULT_BLOCK_SIZE = 128
DEFAULT_KEY_BLOCK_SIZE: int | None = 256


# --------------------------------------------------------------------------------------------------------------
# blockwise
# --------------------------------------------------------------------------------------------------------------
def _key_starts(document_ids: Tensor | None, T: int, block: int) -> list[int]:
    """First step-0 key any query of each query block can see (0 without documents): keys of earlier documents are
    skipped. Exact for any document layout: uses the first occurrence of each query's document id."""
    n_blocks = (T + block - 1) // block
    if document_ids is None or T == 0:
        return [0] * n_blocks
    B = document_ids.shape[0]
    _, inverse = torch.unique(document_ids, return_inverse=True)  # [B, T] dense ids
    pos = torch.arange(T, device=document_ids.device).expand(B, T)
    first = torch.full((B, int(inverse.max()) + 1), T, dtype=torch.long, device=document_ids.device)
    first = first.scatter_reduce(1, inverse, pos, reduce="amin").gather(1, inverse)  # [B, T]
    pad = n_blocks * block - T
    first = torch.nn.functional.pad(first, (0, pad), value=T).view(B, n_blocks, block)
    return first.amin(dim=(0, 2)).tolist()


class _Tiles:
    """Per-call constants shared by forward and backward: fp32 views of the inputs and the tile masks."""

    def __init__(self, q: Tensor, keys: Sequence[Tensor], values: Sequence[Tensor], key_mask: Tensor | None,
                 document_ids: Tensor | None, block: int, key_block: int | None) -> None:
        B, h, T, D = q.shape
        hk = keys[0].shape[1]
        if h % hk:
            raise ValueError(f"query heads ({h}) must be a multiple of key/value heads ({hk})")
        self.B, self.hk, self.rep, self.T, self.D = B, hk, h // hk, T, D
        self.scale = D**-0.5
        dtype = torch.promote_types(q.dtype, torch.float32)
        # GQA without copies of K/V: query heads g*rep..g*rep+rep-1 share kv head g (repeat_interleave order)
        self.q = (q.to(dtype) * self.scale).reshape(B, hk, self.rep, T, D)
        self.k = [k.to(dtype) for k in keys]
        self.v = [v.to(dtype) for v in values]
        # prefix counts (Python ints) that let a tile skip its padding / document mask when it cannot matter
        self.key_mask = self.doc = None
        if key_mask is not None:
            key_mask = key_mask.to(device=q.device, dtype=torch.bool)
            padded = (~key_mask).any(dim=0).long()  # [T]: some row has padding at key s
            if bool(padded.any()):
                self.key_mask = key_mask
                self.padded_prefix = [0, *padded.cumsum(0).tolist()]
        if document_ids is not None:
            change = (document_ids[:, 1:] != document_ids[:, :-1]).any(dim=0).long()  # [T-1]: a document starts at s+1
            if bool(change.any()):
                self.doc = document_ids
                self.change_prefix = [0, 0, *change.cumsum(0).tolist()]  # [s + 1]: changes at positions 1..s
        self.block = block
        self.key_block = key_block
        self.key_starts = _key_starts(document_ids, T, block)
        self.positions = torch.arange(T, device=q.device)

    def query_blocks(self):
        for b, i0 in enumerate(range(0, self.T, self.block)):
            yield i0, min(i0 + self.block, self.T), self.key_starts[b]

    def key_tiles(self, lo: int, hi: int):
        step = hi - lo if self.key_block is None else self.key_block
        start = lo if self.key_block is None else (lo // step) * step
        for j0 in range(start, hi, max(step, 1)):
            yield j0, min(j0 + step, hi)

    def mask(self, i0: int, i1: int, j0: int, j1: int) -> Tensor | None:
        """bool ``[B or 1, 1, 1, n or 1, kt]`` (True = visible), or None when the whole tile is visible."""
        allowed = None
        if j1 - 1 > i0:  # the tile crosses the diagonal
            allowed = self.positions[None, j0:j1] <= self.positions[i0:i1, None]  # [n, kt]
        if self.key_mask is not None and self.padded_prefix[j1] > self.padded_prefix[j0]:
            km = self.key_mask[:, None, j0:j1]  # [B, 1, kt]
            allowed = km if allowed is None else allowed & km
        if self.doc is not None and self.change_prefix[max(i1, j1)] > self.change_prefix[j0 + 1]:
            # some document starts inside (j0, max(i1, j1)): queries and keys may belong to different documents
            same = self.doc[:, i0:i1, None] == self.doc[:, None, j0:j1]  # [B, n, kt]
            allowed = same if allowed is None else allowed & same
        if allowed is None:
            return None
        return (allowed if allowed.dim() == 3 else allowed[None])[:, None, None]  # broadcasts over heads

    def diagonal(self, i0: int, i1: int) -> tuple[Tensor, Tensor, Tensor] | None:
        """Keys/values of steps 1..k at positions i0..i1 ``[B, hk, n, k, D]`` and their scores ``[B, hk, rep, n, k]``."""
        if len(self.k) == 1:
            return None
        kd = torch.stack([k[:, :, i0:i1] for k in self.k[1:]], dim=-2)
        vd = torch.stack([v[:, :, i0:i1] for v in self.v[1:]], dim=-2)
        qb = self.q[:, :, :, i0:i1]
        return kd, vd, (qb.unsqueeze(-2) * kd.unsqueeze(2)).sum(-1)


class TTTAttentionFunction(torch.autograd.Function):
    """Blockwise TTT attention (flash-attention style, in PyTorch). Inputs after the options: keys then values."""

    @staticmethod
    def forward(ctx, q: Tensor, key_mask: Tensor | None, document_ids: Tensor | None, block: int,
                key_block: int | None, n_steps: int, *kv: Tensor) -> Tensor:
        keys, values = kv[:n_steps], kv[n_steps:]
        t = _Tiles(q, keys, values, key_mask, document_ids, block, key_block)
        B, hk, rep, T, D = t.B, t.hk, t.rep, t.T, t.D
        out = torch.empty(B, hk, rep, T, D, dtype=q.dtype, device=q.device)
        lse = torch.empty(B, hk, rep, T, dtype=t.q.dtype, device=q.device)
        k0, v0 = t.k[0], t.v[0]
        for i0, i1, lo in t.query_blocks():
            n = i1 - i0
            qb = t.q[:, :, :, i0:i1].reshape(B, hk, rep * n, D)
            diag = t.diagonal(i0, i1)
            if diag is None:
                m = torch.full((B, hk, rep, n), float("-inf"), dtype=qb.dtype, device=q.device)
                l = torch.zeros_like(m)
                acc = torch.zeros(B, hk, rep, n, D, dtype=qb.dtype, device=q.device)
            else:  # the same-position keys of steps 1..k open the online softmax (their scores are always finite)
                kd, vd, sd = diag
                m = sd.amax(-1)
                pd = torch.exp(sd - m[..., None])
                l = pd.sum(-1)
                acc = (pd.unsqueeze(-1) * vd.unsqueeze(2)).sum(-2)
            for j0, j1 in t.key_tiles(lo, i1):
                s = torch.matmul(qb, k0[:, :, j0:j1].transpose(-1, -2)).view(B, hk, rep, n, j1 - j0)
                allowed = t.mask(i0, i1, j0, j1)
                if allowed is not None:
                    s.masked_fill_(~allowed, float("-inf"))
                m_new = torch.maximum(m, s.amax(-1))
                m_safe = torch.where(torch.isinf(m_new), torch.zeros_like(m_new), m_new)  # all -inf so far
                alpha = torch.exp(m - m_safe)
                p = s.sub_(m_safe[..., None]).exp_()
                l = l * alpha + p.sum(-1)
                pv = torch.matmul(p.view(B, hk, rep * n, j1 - j0), v0[:, :, j0:j1]).view(B, hk, rep, n, D)
                acc = acc * alpha[..., None] + pv
                m = m_new
            empty = l == 0  # step 0 only: no visible key at all (see the module docstring); marked by lse = +inf
            m_safe = torch.where(torch.isinf(m), torch.zeros_like(m), m)
            lse[:, :, :, i0:i1] = torch.where(empty, torch.full_like(m, float("inf")), m_safe + torch.log(l))
            out[:, :, :, i0:i1] = acc / torch.where(empty, torch.ones_like(l), l)[..., None]
        if n_steps == 1 and t.key_mask is not None:  # only padding can hide every key (a query sees itself)
            empty = torch.isposinf(lse)
            if bool(empty.any()):  # masked_fill(finfo.min) + softmax: uniform over all T step-0 values
                out.copy_(torch.where(empty[..., None], v0.mean(dim=2)[:, :, None, None, :].to(out.dtype), out))
        ctx.save_for_backward(q, out, lse, document_ids, key_mask, *keys, *values)
        ctx.options = (block, key_block, n_steps)
        return out.view(B, hk * rep, T, D)

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        q, out, lse, document_ids, key_mask, *kv = ctx.saved_tensors
        block, key_block, n_steps = ctx.options
        keys, values = kv[:n_steps], kv[n_steps:]
        t = _Tiles(q, keys, values, key_mask, document_ids, block, key_block)
        B, hk, rep, T, D = t.B, t.hk, t.rep, t.T, t.D
        f32 = t.q.dtype
        dout = grad_out.to(f32).reshape(B, hk, rep, T, D)
        delta = (dout * out.to(f32)).sum(-1)  # [B, hk, rep, T]: rowsum(dO * O), as in flash-attention's backward
        dq = torch.zeros_like(t.q)
        dk = [torch.zeros(B, hk, T, D, dtype=f32, device=q.device) for _ in keys]
        dv = [torch.zeros(B, hk, T, D, dtype=f32, device=q.device) for _ in values]
        k0, v0 = t.k[0], t.v[0]
        for i0, i1, lo in t.query_blocks():
            n = i1 - i0
            qb5 = t.q[:, :, :, i0:i1]
            qb = qb5.reshape(B, hk, rep * n, D)
            do5 = dout[:, :, :, i0:i1]
            do = do5.reshape(B, hk, rep * n, D)
            lse_b, delta_b = lse[:, :, :, i0:i1], delta[:, :, :, i0:i1]
            dqb = torch.zeros(B, hk, rep * n, D, dtype=f32, device=q.device)
            diag = t.diagonal(i0, i1)
            if diag is not None:
                kd, vd, sd = diag
                pd = torch.exp(sd - lse_b[..., None])  # [B, hk, rep, n, k]
                dpd = (do5.unsqueeze(-2) * vd.unsqueeze(2)).sum(-1)
                dsd = pd * (dpd - delta_b[..., None])
                dqb += (dsd.unsqueeze(-1) * kd.unsqueeze(2)).sum(-2).reshape(B, hk, rep * n, D)
                dkd = (dsd.unsqueeze(-1) * qb5.unsqueeze(-2)).sum(2)  # [B, hk, n, k, D]: summed over the group
                dvd = (pd.unsqueeze(-1) * do5.unsqueeze(-2)).sum(2)
                for j in range(1, n_steps):
                    dk[j][:, :, i0:i1] += dkd[:, :, :, j - 1]
                    dv[j][:, :, i0:i1] += dvd[:, :, :, j - 1]
            lse_col = lse_b.reshape(B, hk, rep * n, 1)
            delta_col = delta_b.reshape(B, hk, rep * n, 1)
            for j0, j1 in t.key_tiles(lo, i1):
                kt, vt = k0[:, :, j0:j1], v0[:, :, j0:j1]
                s = torch.matmul(qb, kt.transpose(-1, -2))  # [B, hk, rep*n, kt]
                allowed = t.mask(i0, i1, j0, j1)
                if allowed is not None:
                    s.view(B, hk, rep, n, j1 - j0).masked_fill_(~allowed, float("-inf"))
                p = s.sub_(lse_col).exp_()
                dv[0][:, :, j0:j1] += torch.matmul(p.transpose(-1, -2), do)  # sums the rep query heads
                ds = torch.matmul(do, vt.transpose(-1, -2)).sub_(delta_col).mul_(p)
                dqb += torch.matmul(ds, kt)
                dk[0][:, :, j0:j1] += torch.matmul(ds.transpose(-1, -2), qb)
            dq[:, :, :, i0:i1] = dqb.view(B, hk, rep, n, D)
        empty = torch.isposinf(lse)  # step-0 rows with no visible key: uniform over all T values
        if n_steps == 1 and t.key_mask is not None and bool(empty.any()):
            dv[0] += (dout * empty[..., None]).sum(dim=(2, 3))[:, :, None, :] / T
        dq = (dq * t.scale).view(B, hk * rep, T, D).to(q.dtype)
        grads_k = [g.to(k.dtype) for g, k in zip(dk, keys, strict=True)]
        grads_v = [g.to(v.dtype) for g, v in zip(dv, values, strict=True)]
        return (dq, None, None, None, None, None, *grads_k, *grads_v)


def ttt_attention(q: Tensor, keys: Sequence[Tensor], values: Sequence[Tensor], key_mask: Tensor | None = None,
                  document_ids: Tensor | None = None, block_size: int = DEFAULT_BLOCK_SIZE,
                  key_block_size: int | None = DEFAULT_KEY_BLOCK_SIZE) -> Tensor:
    """Blockwise TTT attention of step ``len(keys) - 1``; same result as the dense reference (``tests/references.py``).

    Args:
        q: ``[B, h, T, D]`` queries of the current step (fp32 or bf16; RoPE already applied).
        keys / values: per step ``[B, h_kv, T, D]``, step 0 first and the current step last; ``h_kv`` divides ``h``
            (GQA: query head i uses kv head ``i // (h // h_kv)``, as ``repeat_interleave``); never copied per head.
        key_mask: bool/0-1 ``[B, T]``, False = padding key (excluded from the step-0 keys).
        document_ids: int ``[B, T]`` for packed rows: step-0 key s is visible to query t iff
            ``s <= t and document_ids[s] == document_ids[t]``.
        block_size: queries per block; key_block_size: step-0 keys per tile (None: a block's whole causal range).
    Returns:
        ``[B, h, T, D]`` in q's dtype. Scores, softmax and log-sum-exp are fp32; memory is linear in T.
    """
    if len(keys) != len(values) or not keys:
        raise ValueError(f"need one key and one value tensor per TTT step, got {len(keys)} and {len(values)}")
    if q.dim() != 4 or any(k.shape != keys[0].shape or k.dim() != 4 for k in (*keys, *values)):
        raise ValueError(f"q must be [B, h, T, D] and every key/value [B, h_kv, T, D]; got q {tuple(q.shape)}, "
                         f"keys {[tuple(k.shape) for k in keys]}, values {[tuple(v.shape) for v in values]}")
    B, h, T, D = q.shape
    if keys[0].shape[0] != B or keys[0].shape[2:] != (T, D):
        raise ValueError(f"keys {tuple(keys[0].shape)} do not fit q {tuple(q.shape)}")
    if block_size < 1 or (key_block_size is not None and key_block_size < 1):
        raise ValueError(f"block sizes must be positive, got {block_size}, {key_block_size}")
    for name, extra in (("key_mask", key_mask), ("document_ids", document_ids)):
        if extra is not None and tuple(extra.shape) != (B, T):
            raise ValueError(f"{name} must be [B, T] = {(B, T)}, got {tuple(extra.shape)}")
    return TTTAttentionFunction.apply(q, key_mask, document_ids, int(block_size), key_block_size, len(keys),
                                      *keys, *values)
