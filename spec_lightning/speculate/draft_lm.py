"""Drafting with a standalone draft language model (DistillSpec-style): chains and EAGLE-2 dynamic trees.

The draft is a Hugging Face causal LM run through the same wrapper as the target
(:class:`~spec_lightning.targets.FrozenTarget`, its cached :meth:`~spec_lightning.targets.FrozenTarget.step`); it
reads tokens only, no target features. Its KV cache holds the verified sequence; drafted tokens are dropped after
every round. Trees are expanded level by level in the same cache, each node seeing the verified prefix and its own
ancestors (a visibility mask over the cached slots).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from spec_lightning.speculate.sampling import draw_chain
from spec_lightning.speculate.tree import DraftTree, build_dynamic_tree, check_tree_settings, frontier_visibility
from spec_lightning.targets import FrozenTarget, TargetStep, keep_cache_positions


class DraftLMDrafter:
    """Drafts with a small causal LM sharing the target's tokenizer.

    Args:
        model: the draft LM (any HF causal LM; kept as it is, decoded under ``no_grad``).
        tree_topk / tree_depth / tree_total_tokens: EAGLE-2 dynamic-tree settings (as for EAGLE-3).
    """

    aux_layer_ids: tuple[int, ...] = ()
    max_chain: int | None = None

    def __init__(self, model: nn.Module, tree_topk: int = 4, tree_depth: int = 5, tree_total_tokens: int = 24) -> None:
        check_tree_settings(tree_topk, tree_depth, tree_total_tokens)
        self.model: nn.Module = model
        self.lm = FrozenTarget(model, freeze=False, check_logits=False)
        self.tree_topk, self.tree_depth, self.tree_total_tokens = tree_topk, tree_depth, tree_total_tokens
        self.reset()

    def reset(self) -> None:
        self.cache = self.lm.new_cache()
        self.seen: list[int] = []  # tokens in the draft cache, in order (always a prefix of the sequence)
        self.sequence: list[int] = []
        self.last_logits: Tensor | None = None

    def _length(self) -> int:
        return int(self.cache.get_seq_length())

    def _keep(self, n: int) -> None:
        if self._length() > n:
            keep_cache_positions(self.cache, torch.arange(n))

    @torch.no_grad()
    def _feed(self, tokens: list[int]) -> Tensor:
        """Append verified ``tokens`` to the cache; the draft's logits ``[V]`` after the last one."""
        step = self.lm.step(torch.tensor(tokens, dtype=torch.long), self.cache)
        return self.lm.logits(step.hidden[-1:])[0]

    # --- Drafter protocol -------------------------------------------------------------------------------------
    @torch.no_grad()
    def observe(self, step: TargetStep, next_tokens: Tensor, sequence: list[int]) -> None:
        common = 0  # the longest cached prefix that is still the sequence (drafted tokens are never kept)
        while common < min(len(self.seen), len(sequence)) and self.seen[common] == sequence[common]:
            common += 1
        self._keep(common)
        self.seen = list(sequence[:common])
        self.sequence = list(sequence)
        self.last_logits = self._feed(self.sequence[common:])
        self.seen = list(self.sequence)

    @torch.no_grad()
    def propose_chain(self, k: int, temperature: float = 0.0,
                      generator: torch.Generator | None = None) -> tuple[Tensor, Tensor | None]:
        assert self.last_logits is not None, "observe() must run before drafting"
        chain = draw_chain(self.last_logits, k, temperature, generator, lambda tokens, j: self._feed(tokens[-1:]))
        self._keep(len(self.sequence))
        return chain

    @torch.no_grad()
    def propose_tree(self, max_depth: int) -> DraftTree:
        assert self.last_logits is not None, "observe() must run before drafting"
        R = len(self.sequence)
        slot: dict[int, int] = {}  # node -> its slot in the draft cache
        slot_positions: list[int] = list(range(R))  # absolute position of every cached slot

        def expand(frontier: list[int], tokens: list[int], parents: list[int]) -> Tensor:
            s, f = self._length(), len(frontier)
            visible, depth = frontier_visibility(frontier, parents, slot, R, s)
            positions = torch.full((f,), R + depth - 1, dtype=torch.long)  # a depth-d node sits at position R + d - 1
            step = self.lm.step(torch.tensor([tokens[c] for c in frontier]), self.cache,
                                tree_mask=visible[:, s:], visible=visible[:, :s], positions=positions,
                                cached_positions=torch.tensor(slot_positions))
            slot_positions.extend(positions.tolist())
            return self.lm.logits(step.hidden)

        tree = build_dynamic_tree(self.last_logits, expand, lambda ids: ids, self.tree_topk,
                                  min(self.tree_depth, max_depth), self.tree_total_tokens)
        self._keep(R)
        return tree
