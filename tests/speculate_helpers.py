"""Shared helpers for the speculative-decoding tests: a reference greedy loop and oracle drafts."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from spec_lightning.drafts.eagle3 import Eagle3Config, Eagle3Draft
from spec_lightning.drafts.medusa import MedusaConfig, MedusaHeads
from spec_lightning.speculate.dflash import DFlashDrafter
from spec_lightning.speculate.eagle3 import Eagle3Drafter
from spec_lightning.speculate.medusa import MedusaDrafter


class Reference:
    """The target's own greedy continuation: full forward without cache, argmax, append (memoised)."""

    def __init__(self, model) -> None:
        self.model = model
        self.memo: dict[tuple[int, ...], int] = {}

    @torch.no_grad()
    def next(self, ids: Sequence[int]) -> int:
        key = tuple(int(i) for i in ids)
        if key not in self.memo:
            self.memo[key] = int(self.model(torch.tensor([key])).logits[0, -1].argmax())
        return self.memo[key]

    def generate(self, prompt: Sequence[int], n: int, eos: Sequence[int] = ()) -> list[int]:
        ids = list(prompt)
        out: list[int] = []
        for _ in range(n):
            out.append(self.next(ids))
            ids.append(out[-1])
            if out[-1] in eos:
                break
        return out


def random_medusa(num_heads: int = 3, vocab: int = 128, seed: int = 0) -> MedusaHeads:
    torch.manual_seed(seed)
    heads = MedusaHeads(MedusaConfig.tiny(num_heads=num_heads, vocab_size=vocab))
    for p in heads.parameters():
        torch.nn.init.normal_(p, std=0.3)
    return heads


def random_eagle3(model, draft_vocab_size: int = 64, seed: int = 0, shuffle_vocab: bool = True,
                  aux_layer_ids: list[int] | None = None) -> Eagle3Draft:
    """A random EAGLE-3 draft for ``model``; the draft vocabulary is a random subset (non-trivial d2t offsets)."""
    torch.manual_seed(seed)
    cfg = Eagle3Config.from_target_config(model.config, draft_vocab_size, aux_layer_ids=aux_layer_ids)
    draft = Eagle3Draft(cfg)
    V = cfg.vocab_size
    ids = torch.randperm(V)[: cfg.draft_vocab_size].sort().values if shuffle_vocab else torch.arange(cfg.draft_vocab_size)
    t2d = torch.zeros(V, dtype=torch.bool)
    t2d[ids] = True
    draft.set_vocab(ids - torch.arange(cfg.draft_vocab_size), t2d)
    with torch.no_grad():
        draft.embed_tokens.weight.copy_(model.get_input_embeddings().weight)
        for name, p in draft.named_parameters():
            if "norm" not in name and "embed" not in name:
                torch.nn.init.normal_(p, std=0.3)
    return draft


def _one_hot_ranked(correct: int, vocab: int, rank: int, wrong_shift: int = 1) -> Tensor:
    """Logits with ``correct`` at ``rank`` (0 = top) and ``rank`` wrong tokens above it."""
    logits = torch.zeros(vocab)
    for r in range(rank):
        logits[(correct + wrong_shift + r) % vocab] = 10.0 - r
    logits[correct] = 10.0 - rank
    return logits


class OracleMedusa(MedusaDrafter):
    """Heads that know the target's greedy future. ``ranks[h]``: where the right token sits in head h's top-k
    (0 = always right as top-1); ``always_wrong`` puts a wrong token first everywhere and the right one nowhere."""

    def __init__(self, heads: MedusaHeads, reference: Reference, ranks: Sequence[int] | None = None,
                 always_wrong: bool = False, **kwargs) -> None:
        super().__init__(heads, **kwargs)
        self.reference = reference
        self.ranks = list(ranks) if ranks is not None else [0] * self.num_heads
        self.always_wrong = always_wrong

    def head_logits(self) -> Tensor:
        V = self.heads.config.vocab_size
        future = self.reference.generate(self.sequence, self.num_heads)
        future += [0] * (self.num_heads - len(future))
        rows = []
        for h in range(self.num_heads):
            if self.always_wrong:
                logits = torch.zeros(V)
                logits[(future[h] + 1) % V] = 10.0
                rows.append(logits)
            else:
                rows.append(_one_hot_ranked(future[h], V, self.ranks[h]))
        return torch.stack(rows)


class OracleEagle3(Eagle3Drafter):
    """An EAGLE-3 drafter whose logits know the target's greedy next token of every drafted context.

    ``deep_rank``: rank of the right token for rows after the first draft token (1 exercises tree branches);
    ``always_wrong``: a wrong token first everywhere and the right one nowhere near.
    """

    def __init__(self, draft: Eagle3Draft, reference: Reference, deep_rank: int = 0, always_wrong: bool = False,
                 **kwargs) -> None:
        super().__init__(draft, **kwargs)
        self.reference = reference
        self.deep_rank = deep_rank
        self.always_wrong = always_wrong
        self.target_of_draft = self.to_target(torch.arange(draft.config.draft_vocab_size))

    def observe(self, step, next_tokens: Tensor, sequence: list[int]) -> None:
        self._observing = True  # the rows observed are real tokens: their prediction follows no draft token
        try:
            super().observe(step, next_tokens, sequence)
        finally:
            self._observing = False

    def run(self, h: Tensor, tokens: Tensor, positions: Tensor, allowed: Tensor) -> tuple[Tensor, Tensor]:
        """Also record, for each new row, the draft tokens between ``self.sequence`` and its prediction: the tokens
        of the drafted cache slots (at or after ``real_length``) the row sees, itself included, in slot order."""
        first = self.cached
        slot_tokens = getattr(self, "_slot_tokens", {})
        for i, token in enumerate(tokens.tolist()):
            slot_tokens[first + i] = token
        self._slot_tokens = slot_tokens
        if getattr(self, "_observing", False):
            self._paths = [()] * len(tokens)
        else:
            self._paths = [tuple(slot_tokens[s] for s in row.nonzero()[:, 0].tolist() if s >= self.real_length)
                           for row in allowed]
        return super().run(h, tokens, positions, allowed)

    def draft_logits(self, h: Tensor) -> Tensor:
        Vd = self.draft.config.draft_vocab_size
        rows = []
        for path in self._paths[len(self._paths) - h.shape[0]:]:  # the rows of the last run whose logits are asked
            correct = self.reference.next(list(self.sequence) + list(path))
            hit = (self.target_of_draft == correct).nonzero()
            logits = torch.zeros(Vd)
            if self.always_wrong or hit.numel() == 0:
                wrong = int((self.target_of_draft != correct).nonzero()[0])
                logits[wrong] = 10.0
            else:
                logits = _one_hot_ranked(int(hit[0, 0]), Vd, self.deep_rank if path else 0)
            rows.append(logits)
        return torch.stack(rows)


class OracleDFlash(DFlashDrafter):
    """Block logits that know the target's greedy future: slot j right unless j == ``wrong_at`` (then the right
    token is ranked second, so a tree still finds it)."""

    def __init__(self, *args, reference: Reference, sequence: list[int], wrong_at: int | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.reference, self.sequence, self.wrong_at = reference, sequence, wrong_at
        self.forwards = 0

    def block_logits(self, k: int) -> torch.Tensor:
        super().block_logits(k)  # the real network runs too (shapes, cache growth)
        self.forwards += 1
        future = self.reference.generate(self.sequence, k)
        future += [0] * (k - len(future))
        Vt = self.lm_head.weight.shape[0]
        logits = torch.zeros(k, Vt)
        for j, tok in enumerate(future):
            if j == self.wrong_at:
                logits[j, (tok + 1) % Vt] = 10.0
                logits[j, tok] = 9.0
            else:
                logits[j, tok] = 10.0
        return logits

    def observe(self, step, next_tokens, sequence):
        super().observe(step, next_tokens, sequence)
        self.sequence = sequence
