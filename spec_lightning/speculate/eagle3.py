"""EAGLE-3 drafting at decode time: a KV-cached draft, chains and EAGLE-2-style dynamic trees (SPEC §3).

Draft position p combines target features of token p (``fc(aux)`` for verified tokens, the draft's own
**un-normed** output h for drafted ones) with the embedding of token p+1, at RoPE position p, and predicts token
p+2 — the inference view of the TTT loop of SPEC §3.7: chain step j at position t attends to the verified
(step-0) keys up to t and to the keys of its own earlier steps, which here are simply the cached positions
t+1..t+j-1 of the chain. Verified positions stay in the draft cache; drafted ones are dropped after every round.

Tree drafting follows EAGLE-2 (Li et al., 2024): expand the ``topk`` best frontier nodes per depth (score =
cumulative draft log-probability), each giving ``topk`` children, then keep the ``total_tokens`` best nodes
overall (a node is kept only with its parent).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from spec_lightning.drafts.eagle3 import Eagle3Draft, apply_rope
from spec_lightning.speculate.sampling import probs
from spec_lightning.speculate.target import TargetStep
from spec_lightning.speculate.tree import DraftTree


class DraftKV:
    """Per-layer KV cache of the draft: ``[1, kv_heads, S, head_dim]`` keys and values."""

    def __init__(self, num_layers: int) -> None:
        self.keys: list[Tensor | None] = [None] * num_layers
        self.values: list[Tensor | None] = [None] * num_layers

    @property
    def length(self) -> int:
        return 0 if self.keys[0] is None else int(self.keys[0].shape[2])

    def append(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        if self.keys[layer] is not None:
            k = torch.cat([self.keys[layer], k], dim=2)
            v = torch.cat([self.values[layer], v], dim=2)
        self.keys[layer], self.values[layer] = k, v
        return k, v

    def truncate(self, length: int) -> None:
        for i, k in enumerate(self.keys):
            if k is not None:
                self.keys[i] = k[:, :, :length]
                self.values[i] = self.values[i][:, :, :length]


class Eagle3Drafter:
    """Drafts with an :class:`~spec_lightning.drafts.eagle3.Eagle3Draft`.

    Args:
        draft: the trained draft network (its ``embed_tokens`` must hold the target's embedding).
        tree_topk: EAGLE-2 branching: frontier nodes expanded per depth and children per expanded node.
        tree_depth: maximum tree depth (draft tokens on the longest branch).
        tree_total_tokens: draft tokens kept in the verified tree.
    """

    def __init__(self, draft: Eagle3Draft, tree_topk: int = 4, tree_depth: int = 5, tree_total_tokens: int = 24) -> None:
        for name, value in (("tree_topk", tree_topk), ("tree_depth", tree_depth), ("tree_total_tokens", tree_total_tokens)):
            if value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        self.draft = draft
        self.model: nn.Module = draft
        self.aux_layer_ids = tuple(draft.config.aux_layer_ids)
        self.max_chain: int | None = None
        self.tree_topk, self.tree_depth, self.tree_total_tokens = tree_topk, tree_depth, tree_total_tokens
        self.reset()

    # --- state --------------------------------------------------------------------------------------------------
    def reset(self) -> None:
        self.kv = DraftKV(len(self.draft.layers()))
        self.real_length = 0  # verified positions in the draft cache
        self.last_h: Tensor | None = None  # [H] un-normed output at the last verified position
        self.last_logits: Tensor | None = None  # [Vd] its logits (predict the token after the last emitted one)
        self.sequence: list[int] = []

    @property
    def _dtype(self) -> torch.dtype:
        return self.draft.fc.weight.dtype

    @property
    def _device(self) -> torch.device:
        return self.draft.fc.weight.device

    # --- the network ----------------------------------------------------------------------------------------------
    @torch.no_grad()
    def forward(self, h: Tensor, tokens: Tensor, positions: Tensor, allowed: Tensor) -> Tensor:
        """Run the draft layers on n new positions, appending their keys/values to the cache.

        h: ``[n, H]`` input hidden (``fc(aux)`` or an earlier draft output); tokens: ``[n]`` the token embedded at
        each position; positions: ``[n]`` RoPE positions; allowed: bool ``[n, S + n]`` which cached (S) and new
        positions each query sees. Returns the un-normed output h ``[n, H]``.
        """
        draft = self.draft
        n = h.shape[0]
        emb = draft.embed_tokens(tokens.to(self._device)).to(h.dtype)[None]  # [1, n, H]
        cos, sin = draft.rotary(positions.to(self._device)[None], h.dtype)
        x_h = h[None]
        mask = allowed.to(self._device)[None, None]  # [1, 1, n, S+n]
        for i, layer in enumerate(draft.layers()):
            if layer.first:  # SPEC §3.6: attention input cat([input_layernorm(emb), hidden_norm(h)]) (2H)
                x = torch.cat([layer.input_layernorm(emb), layer.hidden_norm(x_h)], dim=-1)
            else:
                x = layer.input_layernorm(x_h)
            attn = layer.self_attn
            q = attn.q_proj(x).view(1, n, attn.num_heads, attn.head_dim).transpose(1, 2)
            k = attn.k_proj(x).view(1, n, attn.num_kv_heads, attn.head_dim).transpose(1, 2)
            v = attn.v_proj(x).view(1, n, attn.num_kv_heads, attn.head_dim).transpose(1, 2)
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
            keys, values = self.kv.append(i, k, v)
            rep = attn.num_heads // attn.num_kv_heads
            out = F.scaled_dot_product_attention(q, keys.repeat_interleave(rep, 1), values.repeat_interleave(rep, 1),
                                                 attn_mask=mask)
            x_h = x_h + attn.o_proj(out.transpose(1, 2).reshape(1, n, attn.num_heads * attn.head_dim))
            x_h = x_h + layer.mlp(layer.post_attention_layernorm(x_h))  # residual = un-normed h
        return x_h[0]

    @torch.no_grad()
    def draft_logits(self, h: Tensor, paths: Sequence[tuple[int, ...]]) -> Tensor:
        """``[n, Vd]`` float logits for outputs ``h [n, H]``.

        ``paths[i]`` are the draft tokens between ``self.sequence`` and row i's prediction (unused here; a hook for
        oracle drafts in tests).
        """
        return self.draft.lm_head(self.draft.norm(h)).float()

    def to_target(self, draft_ids: Tensor) -> Tensor:
        """Target ids of draft-vocabulary ids (``target_id = draft_id + d2t[draft_id]``, SPEC §3.4)."""
        return (draft_ids.to(self.draft.d2t.device) + self.draft.d2t[draft_ids.to(self.draft.d2t.device)]).cpu()

    def _causal(self, n: int) -> Tensor:
        s = self.kv.length
        return torch.ones(n, s + n, dtype=torch.bool).tril(diagonal=s)

    # --- Drafter protocol -------------------------------------------------------------------------------------------
    @torch.no_grad()
    def observe(self, step: TargetStep, next_tokens: Tensor, sequence: list[int]) -> None:
        if step.aux is None:
            raise ValueError("EAGLE-3 drafting needs the target's aux hidden states (aux_layer_ids)")
        self.kv.truncate(self.real_length)  # drop the previous round's drafted positions
        n = step.aux.shape[0]
        h = self.draft.fc(step.aux.to(device=self._device, dtype=self._dtype))  # [n, H]
        positions = torch.arange(self.real_length, self.real_length + n)
        out = self.forward(h, next_tokens, positions, self._causal(n))
        self.real_length += n
        self.sequence = sequence
        self.last_h = out[-1]
        self.last_logits = self.draft_logits(out[-1:], [()])[0]

    def _target_q(self, q_draft: Tensor) -> Tensor:
        """A draft-vocabulary distribution ``[Vd]`` as a target-vocabulary one ``[V]``."""
        ids = self.to_target(torch.arange(q_draft.shape[-1])).to(q_draft.device)
        return torch.zeros(self.draft.config.vocab_size, dtype=q_draft.dtype, device=q_draft.device).index_add_(
            0, ids, q_draft)

    @torch.no_grad()
    def propose_chain(self, k: int, temperature: float = 0.0,
                      generator: torch.Generator | None = None) -> tuple[Tensor, Tensor | None]:
        assert self.last_logits is not None, "observe() must run before drafting"
        tokens: list[int] = []
        qs: list[Tensor] = []
        logits, h = self.last_logits, self.last_h
        for j in range(k):
            if temperature == 0:
                draft_id = logits.argmax()[None]
            else:
                q = probs(logits, temperature)
                draft_id = torch.multinomial(q, 1, generator=generator)
                qs.append(self._target_q(q))
            tokens.append(int(self.to_target(draft_id)[0]))
            if j == k - 1:
                break
            position = torch.tensor([self.real_length + j])  # draft token j+1 is embedded at position R + j
            h = self.forward(h[None], torch.tensor([tokens[-1]]), position, self._causal(1))[0]
            logits = self.draft_logits(h[None], [tuple(tokens)])[0]
        self.kv.truncate(self.real_length)
        out = torch.tensor(tokens, dtype=torch.long)
        return out, (torch.stack(qs) if qs else None)

    @torch.no_grad()
    def propose_tree(self, max_depth: int) -> DraftTree:
        assert self.last_logits is not None and self.last_h is not None, "observe() must run before drafting"
        depth = min(self.tree_depth, max_depth)
        empty = DraftTree(torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.long))
        if depth < 1:
            return empty
        R = self.real_length
        topk = min(self.tree_topk, self.last_logits.shape[-1])
        tokens: list[int] = []
        parents: list[int] = []
        scores: list[float] = []
        depths: list[int] = []
        paths: list[tuple[int, ...]] = []
        slot: dict[int, int] = {}  # expanded node -> its draft cache position
        out_h: dict[int, Tensor] = {-1: self.last_h}

        def add_children(parent: int, logits: Tensor) -> list[int]:
            logp = torch.log_softmax(logits, -1)
            vals, ids = logp.topk(topk)
            target_ids = self.to_target(ids.cpu()).tolist()
            base = scores[parent] if parent >= 0 else 0.0
            new = []
            for v, t in zip(vals.tolist(), target_ids, strict=True):
                new.append(len(tokens))
                tokens.append(t)
                parents.append(parent)
                scores.append(base + v)
                depths.append(1 if parent < 0 else depths[parent] + 1)
                paths.append((paths[parent] if parent >= 0 else ()) + (t,))
            return new

        frontier = add_children(-1, self.last_logits)
        for d in range(1, depth):
            s = self.kv.length
            f = len(frontier)
            allowed = torch.zeros(f, s + f, dtype=torch.bool)
            allowed[:, :R] = True
            for i, c in enumerate(frontier):
                a = parents[c]
                while a >= 0:
                    allowed[i, slot[a]] = True
                    a = parents[a]
                allowed[i, s + i] = True
                slot[c] = s + i
            h_in = torch.stack([out_h[parents[c]] for c in frontier])
            position = torch.full((f,), R + d - 1, dtype=torch.long)  # depth-d node sits at position R + d - 1
            h_out = self.forward(h_in, torch.tensor([tokens[c] for c in frontier]), position, allowed)
            logits = self.draft_logits(h_out, [paths[c] for c in frontier])
            created: list[int] = []
            for i, c in enumerate(frontier):
                out_h[c] = h_out[i]
                created += add_children(c, logits[i])
            created.sort(key=lambda c: -scores[c])
            frontier = created[:topk]
        self.kv.truncate(R)
        # keep the best nodes (ties: shallower first, so a parent always precedes its equal-scored child)
        order = sorted(range(len(tokens)), key=lambda c: (-scores[c], depths[c], c))
        kept: list[int] = []
        kept_set: set[int] = set()
        for c in order:
            if len(kept) == self.tree_total_tokens:
                break
            if parents[c] < 0 or parents[c] in kept_set:
                kept.append(c)
                kept_set.add(c)
        kept.sort(key=lambda c: (depths[c], c))  # parents first
        index = {c: i for i, c in enumerate(kept)}
        return DraftTree(torch.tensor([tokens[c] for c in kept], dtype=torch.long),
                         torch.tensor([index[parents[c]] if parents[c] >= 0 else -1 for c in kept], dtype=torch.long))
