"""Draft trees: the candidate continuations verified in one target pass (a chain is a tree with one branch).

Nodes are stored in topological order (a parent before its children). ``parents[i] == -1`` means node i hangs
off the *root*: the last emitted token, which the target has not processed yet and which is row 0 of the
verification input ``[root, node_0, ..., node_{n-1}]``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class DraftTree:
    """tokens: ``[n]`` target-vocabulary ids; parents: ``[n]`` parent node index or -1 (the root)."""

    tokens: Tensor
    parents: Tensor

    def __post_init__(self) -> None:
        if self.tokens.shape != self.parents.shape or self.tokens.dim() != 1:
            raise ValueError(f"tokens {tuple(self.tokens.shape)} and parents {tuple(self.parents.shape)} must be "
                             "1D tensors of the same length")
        for i, p in enumerate(self.parents.tolist()):
            if not -1 <= p < i:
                raise ValueError(f"node {i} has parent {p}; parents must come before their children (or be -1)")

    @property
    def size(self) -> int:
        return int(self.tokens.shape[0])

    @property
    def is_chain(self) -> bool:
        return self.parents.tolist() == list(range(-1, self.size - 1))

    def depths(self) -> Tensor:
        """``[n]`` depth of each node (1 for the root's children)."""
        depth: list[int] = []
        for p in self.parents.tolist():
            depth.append(1 if p < 0 else depth[p] + 1)
        return torch.tensor(depth, dtype=torch.long)

    def max_depth(self) -> int:
        return int(self.depths().max()) if self.size else 0

    def verify_mask(self) -> Tensor:
        """bool ``[n+1, n+1]`` over ``[root, nodes]``: row i sees column j iff j is i itself or an ancestor."""
        n = self.size
        mask = torch.eye(n + 1, dtype=torch.bool)
        mask[:, 0] = True  # everything sees the root
        for i, p in enumerate(self.parents.tolist()):
            if p >= 0:
                mask[i + 1] |= mask[p + 1]
        return mask

    def children(self) -> list[list[int]]:
        """``children[p + 1]``: node indices whose parent is p (index 0 holds the root's children)."""
        out: list[list[int]] = [[] for _ in range(self.size + 1)]
        for i, p in enumerate(self.parents.tolist()):
            out[p + 1].append(i)
        return out


def chain_tree(tokens: Tensor) -> DraftTree:
    tokens = tokens.reshape(-1).long().cpu()
    return DraftTree(tokens, torch.arange(-1, tokens.shape[0] - 1, dtype=torch.long))


def greedy_accept(tree: DraftTree, target_argmax: Sequence[int] | Callable[[int], int]) -> tuple[list[int], int]:
    """Greedy verification: follow the branch that matches the target's argmax at every step.

    target_argmax: the target's argmax token at each row of ``[root, nodes]`` (``n + 1`` ids), or a function of
    the row index giving it; the function is called only for the rows on the accepted path (``len(path) + 1``
    rows), so a caller can compute the target's logits lazily.
    Returns ``(accepted node indices along the path, the target's own next token after the path)``.
    """
    argmax_at = target_argmax if callable(target_argmax) else target_argmax.__getitem__
    children = tree.children()
    tokens = tree.tokens.tolist()
    path: list[int] = []
    row = 0  # row 0 is the root; node i is row i + 1
    while True:
        want = int(argmax_at(row))
        match = next((c for c in children[row] if tokens[c] == want), None)
        if match is None:
            return path, want
        path.append(match)
        row = match + 1


def validate_choices(choices: Sequence[Sequence[int]], num_heads: int, topk: int | None = None) -> list[tuple[int, ...]]:
    """Check a Medusa sparse-tree choice list and sort it parents-first.

    Each choice is a tuple of top-k ranks, one per depth: ``(0, 1)`` = the top-1 token of head 0 followed by the
    top-2 token of head 1. Every prefix of a choice must be a choice too.
    """
    out = sorted({tuple(int(r) for r in c) for c in choices}, key=lambda c: (len(c), c))
    present = set(out)
    for c in out:
        if not c:
            raise ValueError("Medusa tree choices must be non-empty tuples of ranks")
        if len(c) > num_heads:
            raise ValueError(f"Medusa tree choice {c} is deeper than the {num_heads} heads")
        if any(r < 0 or (topk is not None and r >= topk) for r in c):
            raise ValueError(f"Medusa tree choice {c} has a rank outside [0, {topk})")
        if len(c) > 1 and c[:-1] not in present:
            raise ValueError(f"Medusa tree choice {c} lacks its prefix {c[:-1]} (every prefix must be a choice)")
    return out


# A small sparse tree (22 nodes, depth 4) in the style of Medusa's ``mc_sim_7b`` choices: wide near the root,
# a top-1 spine deeper down.
DEFAULT_MEDUSA_CHOICES: tuple[tuple[int, ...], ...] = (
    (0,), (1,), (2,), (3,),
    (0, 0), (0, 1), (0, 2), (1, 0), (1, 1), (2, 0), (3, 0),
    (0, 0, 0), (0, 0, 1), (0, 1, 0), (1, 0, 0), (0, 2, 0), (2, 0, 0),
    (0, 0, 0, 0), (0, 0, 0, 1), (0, 0, 1, 0), (0, 1, 0, 0), (1, 0, 0, 0),
)


def tree_from_choices(choices: Sequence[tuple[int, ...]], head_topk: Tensor) -> DraftTree:
    """Medusa tree: node for choice c takes ``head_topk[len(c) - 1, c[-1]]`` (heads do not see the parent token).

    choices: validated, parents-first (see :func:`validate_choices`); head_topk: ``[K, topk]`` token ids.
    """
    index = {c: i for i, c in enumerate(choices)}
    tokens = torch.tensor([int(head_topk[len(c) - 1, c[-1]]) for c in choices], dtype=torch.long)
    parents = torch.tensor([index[c[:-1]] if len(c) > 1 else -1 for c in choices], dtype=torch.long)
    return DraftTree(tokens, parents)


def check_tree_settings(tree_topk: int, tree_depth: int, tree_total_tokens: int) -> None:
    """Refuse dynamic-tree settings below 1, naming the setting."""
    for name, value in (("tree_topk", tree_topk), ("tree_depth", tree_depth), ("tree_total_tokens", tree_total_tokens)):
        if value < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")


def build_dynamic_tree(first_logits: Tensor, expand: Callable[[list[int], list[int], list[int]], Tensor],
                       to_target: Callable[[Tensor], Tensor], topk: int, depth: int, total_tokens: int) -> DraftTree:
    """EAGLE-2's dynamic draft tree (Li et al., 2024), for any draft that can score a frontier of nodes.

    Expand the ``topk`` best frontier nodes per depth (score = cumulative draft log-probability), each giving
    ``topk`` children, then keep the ``total_tokens`` best nodes overall (a node is kept only with its parent).

    Args:
        first_logits: ``[V']`` draft logits of the token after the last emitted one (depth-1 candidates).
        expand: ``expand(frontier, tokens, parents)`` runs the draft on the ``frontier`` nodes (indices into the
            growing ``tokens``/``parents`` lists of target ids and parent indices, -1 = the root) and returns their
            logits ``[len(frontier), V']`` (the draft's next-token scores after each node).
        to_target: maps draft-vocabulary ids ``[n]`` to target ids (identity for full-vocabulary drafts).
    """
    if depth < 1:
        return DraftTree(torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.long))
    topk = min(topk, first_logits.shape[-1])
    tokens: list[int] = []
    parents: list[int] = []
    scores: list[float] = []
    depths: list[int] = []

    def add_children(parent: int, logits: Tensor) -> list[int]:
        vals, ids = torch.log_softmax(logits.float(), -1).topk(topk)
        base = scores[parent] if parent >= 0 else 0.0
        new = []
        for v, t in zip(vals.tolist(), to_target(ids.cpu()).tolist(), strict=True):
            new.append(len(tokens))
            tokens.append(int(t))
            parents.append(parent)
            scores.append(base + v)
            depths.append(1 if parent < 0 else depths[parent] + 1)
        return new

    frontier = add_children(-1, first_logits)
    for _ in range(1, depth):
        logits = expand(frontier, tokens, parents)
        created: list[int] = []
        for i, c in enumerate(frontier):
            created += add_children(c, logits[i])
        created.sort(key=lambda c: -scores[c])
        frontier = created[:topk]
    # keep the best nodes (ties: shallower first, so a parent always precedes its equal-scored child)
    order = sorted(range(len(tokens)), key=lambda c: (-scores[c], depths[c], c))
    kept: list[int] = []
    kept_set: set[int] = set()
    for c in order:
        if len(kept) == total_tokens:
            break
        if parents[c] < 0 or parents[c] in kept_set:
            kept.append(c)
            kept_set.add(c)
    kept.sort(key=lambda c: (depths[c], c))  # parents first
    index = {c: i for i, c in enumerate(kept)}
    return DraftTree(torch.tensor([tokens[c] for c in kept], dtype=torch.long),
                     torch.tensor([index[parents[c]] if parents[c] >= 0 else -1 for c in kept], dtype=torch.long))


def ancestors(node: int, parents: Sequence[int]) -> list[int]:
    """Nodes on the path from the root to ``node`` (excluded), nearest first."""
    out = []
    a = parents[node]
    while a >= 0:
        out.append(a)
        a = parents[a]
    return out


def frontier_visibility(frontier: list[int], parents: Sequence[int], slot: dict[int, int], prefix: int,
                        cached: int) -> tuple[Tensor, int]:
    """What the nodes of one tree level see when a draft with a KV cache expands them, and their depth.

    The draft cache holds ``cached`` slots: the verified prefix in its first ``prefix`` and the expanded nodes after
    it (``slot``: node -> slot). The frontier's nodes are appended at ``cached + i``, in order (``slot`` is updated).
    Returns ``visible [f, cached + f]``: each node sees the prefix, its ancestors' slots and itself, nothing else;
    and the level's depth (the root's children have depth 1).
    """
    f = len(frontier)
    visible = torch.zeros(f, cached + f, dtype=torch.bool)
    visible[:, :prefix] = True
    for i, c in enumerate(frontier):
        for a in ancestors(c, parents):
            visible[i, slot[a]] = True
        visible[i, cached + i] = True
        slot[c] = cached + i
    return visible, len(ancestors(frontier[0], parents)) + 1
