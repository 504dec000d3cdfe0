"""DFlash drafting at decode time: one draft forward proposes a whole block (``docs/dflash.md``; vLLM's
``DFlashProposer``).

The draft keeps the keys/values of the verified context (``hidden_norm(fc(aux))`` of every token the target has
verified, at its position) and nothing else. A round appends the context of the newly verified tokens, then runs the
block ``[last emitted token, mask x k]`` at positions ``S .. S + k`` (S = verified tokens) in one non-causal forward
over context + block; slot j's logits (``norm`` then the target's lm_head) give draft token j. As in vLLM, the
block is ``1 + k`` slots for a chain of k (``num_speculative_tokens``), whatever block size the draft was trained
with (at most ``block_size - 1``).

Chains take each slot's argmax (or, sampling, one draw from each slot's ``softmax(logits / T)``; the slots do not see
each other's draws, so each q is known before its token is drawn, as the lossless verification needs). Trees take
each slot's top-k: the chain of top-1 tokens with the other top-k candidates of every slot branching off it. Both as
Medusa's heads do (``speculate.slots``).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from spec_lightning.drafts.dflash import KV, DFlashDraft
from spec_lightning.speculate.slots import SlotDrafter
from spec_lightning.speculate.tree import check_tree_settings, validate_choices
from spec_lightning.targets import TargetStep


def spine_choices(depth: int, topk: int, total: int) -> list[tuple[int, ...]]:
    """Tree choices (Medusa notation, parents first): the top-1 chain to ``depth`` with slot d's ranks 1..topk-1 as
    leaves hanging off its depth-(d-1) node; the first ``total`` of them, depth by depth."""
    choices = [(0,) * (d - 1) + (r,) for d in range(1, depth + 1) for r in range(topk)]
    return choices[:total]


class DFlashDrafter(SlotDrafter):
    """Drafts with a :class:`~spec_lightning.drafts.dflash.DFlashDraft`.

    Args:
        draft: the trained draft.
        embed_tokens: the target's input embedding (shared).
        lm_head: the target's output embedding (shared, as vLLM shares it; raw logits, no softcap or scale).
        tree_topk: candidates per slot in trees; tree_depth: tree depth (at most ``block_size - 1``);
        tree_total_tokens: draft tokens kept in a tree.
    """

    def __init__(self, draft: DFlashDraft, embed_tokens: nn.Module, lm_head: nn.Module, tree_topk: int = 4,
                 tree_depth: int = 5, tree_total_tokens: int = 24) -> None:
        check_tree_settings(tree_topk, tree_depth, tree_total_tokens)
        self.draft, self.model = draft, draft
        self.embed_tokens, self.lm_head = embed_tokens, lm_head
        self.aux_layer_ids = tuple(draft.config.target_layer_ids)
        self.max_chain: int | None = draft.config.block_size - 1
        depth = min(tree_depth, draft.config.block_size - 1)
        self.tree_choices = validate_choices(spine_choices(depth, tree_topk, tree_total_tokens), depth)
        self.tree_topk = tree_topk
        self.reset()

    def reset(self) -> None:
        self.context: list[KV] | None = None
        self.length = 0  # verified positions in the context cache
        self.anchor: int | None = None

    @property
    def _param(self) -> Tensor:
        return self.draft.fc.weight

    @torch.no_grad()
    def observe(self, step: TargetStep, next_tokens: Tensor, sequence: list[int]) -> None:
        if step.aux is None:
            raise ValueError("DFlash drafting needs the target's hidden states of its target_layer_ids")
        n = step.aux.shape[0]
        states = self.draft.project(step.aux.to(device=self._param.device, dtype=self._param.dtype))[None]  # [1,n,H]
        positions = torch.arange(self.length, self.length + n, device=self._param.device)[None]
        new = self.draft.context_kv(states, positions)
        if self.context is None:
            self.context = new
        else:
            self.context = [(torch.cat([k0, k1], 2), torch.cat([v0, v1], 2))
                            for (k0, v0), (k1, v1) in zip(self.context, new, strict=True)]
        self.length += n
        self.anchor = int(sequence[-1])

    @torch.no_grad()
    def block_logits(self, k: int) -> Tensor:
        """``[k, V]`` float logits of the k masked slots after the anchor (one draft forward)."""
        assert self.context is not None and self.anchor is not None, "observe() must run before drafting"
        device = self._param.device
        ids = torch.tensor([[self.anchor] + [self.draft.config.mask_token_id] * k], device=device)
        positions = torch.arange(self.length, self.length + k + 1, device=device)[None]
        hidden = self.draft.block_hidden(self.draft.embed(ids, self.embed_tokens), positions, self.context)
        return self.lm_head(hidden[0, 1:].to(self.lm_head.weight.dtype)).float()

    def slot_logits(self, k: int) -> Tensor:
        return self.block_logits(k)

    def chain_limit(self) -> str:
        return f"a DFlash block proposes at most block_size - 1 = {self.draft.config.block_size - 1} tokens"
