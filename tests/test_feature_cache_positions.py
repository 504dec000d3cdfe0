"""The positions a cache drops (``positions: loss``) never change training: the loss, every metric and every gradient
are bitwise those of the full features, for EAGLE-3 (both mask alignments, both normalisations) and Medusa."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from spec_lightning.datamodules.feature_cache.format import aux_length, final_positions
from spec_lightning.modules.eagle3 import Eagle3Module
from spec_lightning.modules.medusa1 import Medusa1Module
from tests.conftest import make_tiny_llama

VOCAB = 128


class TinyEagle3(Eagle3Module):
    def load_target(self) -> nn.Module:
        return make_tiny_llama(vocab=VOCAB)


class TinyMedusa(Medusa1Module):
    def load_target(self) -> nn.Module:
        return make_tiny_llama(vocab=VOCAB)


def batch_with_prompts_and_tails() -> dict[str, torch.Tensor]:
    """Rows of different lengths (padding), a prompt before each assistant span, spans of one token, and
    non-trainable tails after the last trainable token (an unanswered user turn)."""
    g = torch.Generator().manual_seed(0)
    masks = [[0] * 9 + [1] * 6 + [0] * 4 + [1] * 5 + [0] * 10,   # trailing user turn: 10 tokens never stored as aux
             [0] * 5 + [1] * 12 + [0] * 3 + [1] * 1,               # ends on a trainable token
             [0] * 14 + [1] * 3 + [0] * 2 + [1] * 2 + [0] * 3]
    T = max(len(m) for m in masks)
    ids = torch.randint(3, VOCAB, (len(masks), T), generator=g)
    attn = torch.zeros(len(masks), T, dtype=torch.long)
    lm = torch.zeros_like(attn)
    for i, m in enumerate(masks):
        attn[i, : len(m)] = 1
        lm[i, : len(m)] = torch.tensor(m)
    return {"input_ids": ids, "attention_mask": attn, "loss_mask": lm}


def with_features(module, batch: dict, pruned: bool, max_medusa_heads: int = 5) -> dict:
    feats = module.target(batch["input_ids"], batch["attention_mask"],
                          aux_layer_ids=module.draft_config.aux_layer_ids if isinstance(module, Eagle3Module) else ())
    final, aux = feats.final_hidden.clone(), None if feats.aux_hidden is None else feats.aux_hidden.clone()
    if pruned:  # what the reader hands over: zeros wherever the cache stores nothing (and in padding)
        for i in range(final.shape[0]):
            n = int(batch["attention_mask"][i].sum())
            lm = batch["loss_mask"][i, :n]
            keep = torch.zeros(final.shape[1], dtype=torch.bool)
            keep[:n] = final_positions(lm, "loss", max_medusa_heads)
            final[i, ~keep] = 0
            if aux is not None:
                aux[i, aux_length(lm, "loss"):] = 0
    out = {**batch, "final_hidden": final}
    if aux is not None:
        out["aux_hidden"] = aux
    return out


def run(module, batch, compute) -> tuple[dict, dict[str, torch.Tensor]]:
    module.zero_grad(set_to_none=True)
    out = compute(batch)
    out["loss"].backward()
    grads = {n: p.grad.clone() for n, p in module.named_parameters() if p.grad is not None}
    return out, grads


def assert_identical(full, pruned) -> None:
    (a, ga), (b, gb) = full, pruned
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert ga.keys() == gb.keys() and ga
    for name in ga:
        assert torch.equal(ga[name], gb[name]), name


@pytest.mark.parametrize("alignment", ["specforge", "predicted"])
@pytest.mark.parametrize("normalization", ["all_positions", "valid_positions"])
def test_eagle3_training_is_bitwise_unchanged_by_dropped_positions(alignment, normalization, one_thread):
    torch.manual_seed(0)
    module = TinyEagle3(draft_vocab_size=VOCAB, ttt_length=4, mask_alignment=alignment,
                        loss_normalization=normalization)
    module.configure_model()
    batch = batch_with_prompts_and_tails()
    full, pruned = with_features(module, batch, False), with_features(module, batch, True)
    assert (pruned["aux_hidden"] != full["aux_hidden"]).any() and (pruned["final_hidden"] != full["final_hidden"]).any()
    assert_identical(run(module, full, module.compute), run(module, pruned, module.compute))


@pytest.mark.parametrize("num_heads", [1, 3, 5])
def test_medusa_training_is_bitwise_unchanged_by_dropped_positions(num_heads, one_thread):
    torch.manual_seed(0)
    module = TinyMedusa(num_heads=num_heads)
    module.configure_model()
    batch = batch_with_prompts_and_tails()
    full, pruned = with_features(module, batch, False), with_features(module, batch, True)
    assert_identical(run(module, full, module.compute_losses), run(module, pruned, module.compute_losses))


def test_the_rule_is_tight_more_medusa_heads_than_stored_change_the_loss(one_thread):
    """A 6th head reads final hidden states the 5-head rule drops: the reader refuses that module (see the integrity
    tests), and this shows why."""
    torch.manual_seed(0)
    module = TinyMedusa(num_heads=6)
    module.configure_model()
    batch = batch_with_prompts_and_tails()
    full = module.compute_losses(with_features(module, batch, False))["loss"]
    pruned = module.compute_losses(with_features(module, batch, True, max_medusa_heads=5))["loss"]
    assert not torch.equal(full, pruned)


def test_rules_on_a_hand_built_mask():
    lm = torch.tensor([0, 0, 0, 1, 1, 0, 0, 1, 0, 0, 0])  # last trainable token m = 7
    assert aux_length(lm) == 8  # aux at positions 0..7
    # EAGLE-3 teacher at p with token p-1 (SpecForge) or p+1 (predicted) trainable; Medusa h < 2: p+2, p+3
    keep = final_positions(lm, "loss", max_medusa_heads=2)
    assert keep.nonzero().flatten().tolist() == [0, 1, 2, 3, 4, 5, 6, 8]
    keep = final_positions(lm, "loss", max_medusa_heads=0)
    assert keep.nonzero().flatten().tolist() == [2, 3, 4, 5, 6, 8]
    assert final_positions(lm, "all").all() and aux_length(lm, "all") == 11
