"""MedusaHeads: zero-initialised residual blocks, separate instances, base-logit identity at init."""

from __future__ import annotations

import pytest
import torch
from torch.nn import functional as F

from spec_lightning.drafts.medusa import MedusaConfig, MedusaHeads


def test_config_validates_fields():
    with pytest.raises(ValueError, match="num_heads"):
        MedusaConfig(hidden_size=8, vocab_size=16, num_heads=0)
    with pytest.raises(ValueError, match="hidden_size"):
        MedusaConfig(hidden_size=-1, vocab_size=16)
    with pytest.raises(ValueError, match="num_layers"):
        MedusaConfig(hidden_size=8, vocab_size=16, num_layers=1.5)
    assert MedusaConfig.tiny(num_heads=5).num_heads == 5


def test_parameter_names_follow_vllm_layout():
    heads = MedusaHeads(MedusaConfig(hidden_size=8, vocab_size=16, num_heads=2, num_layers=2))
    shapes = {k: tuple(v.shape) for k, v in heads.state_dict().items()}
    assert shapes == {
        "blocks.0.layers.0.weight": (8, 8), "blocks.0.layers.0.bias": (8,),
        "blocks.0.layers.1.weight": (8, 8), "blocks.0.layers.1.bias": (8,),
        "blocks.1.layers.0.weight": (8, 8), "blocks.1.layers.0.bias": (8,),
        "blocks.1.layers.1.weight": (8, 8), "blocks.1.layers.1.bias": (8,),
        "lm_heads.0.weight": (16, 8), "lm_heads.1.weight": (16, 8),
    }


def test_blocks_and_heads_are_separate_instances():
    # The original code builds `[ResBlock(H)] * n`: one module repeated. Here every layer is its own.
    heads = MedusaHeads(MedusaConfig(hidden_size=8, vocab_size=16, num_heads=3, num_layers=3))
    params = [p for p in heads.parameters()]
    assert len({id(p) for p in params}) == len(params) == 3 * 3 * 2 + 3
    assert sum(p.numel() for p in heads.parameters()) == 3 * 3 * (8 * 8 + 8) + 3 * 16 * 8
    with torch.no_grad():
        heads.blocks[0].layers[0].weight.fill_(1.0)
    assert heads.blocks[0].layers[1].weight.abs().sum() == 0
    assert heads.blocks[1].layers[0].weight.abs().sum() == 0


def test_fresh_heads_give_exactly_the_base_logits():
    torch.manual_seed(0)
    cfg = MedusaConfig.tiny()
    lm_head = torch.randn(cfg.vocab_size, cfg.hidden_size)
    heads = MedusaHeads(cfg)
    heads.init_from_lm_head(lm_head)
    hidden = torch.randn(2, 5, cfg.hidden_size)
    logits = heads(hidden)
    assert logits.shape == (cfg.num_heads, 2, 5, cfg.vocab_size)
    base = hidden @ lm_head.T
    for h in range(cfg.num_heads):
        assert torch.equal(logits[h], base)
    for block in heads.blocks:  # W and b both zero (the original code zeroes only W)
        for layer in block.layers:
            assert torch.count_nonzero(layer.weight) == 0 and torch.count_nonzero(layer.bias) == 0


def test_forward_matches_unrolled_residual_silu():
    torch.manual_seed(1)
    cfg = MedusaConfig(hidden_size=6, vocab_size=10, num_heads=2, num_layers=2)
    heads = MedusaHeads(cfg)
    for p in heads.parameters():
        torch.nn.init.normal_(p)
    x = torch.randn(1, 3, 6)
    out = heads(x)
    sd = heads.state_dict()
    for h in range(2):
        y = x
        for layer in range(2):
            w, b = sd[f"blocks.{h}.layers.{layer}.weight"], sd[f"blocks.{h}.layers.{layer}.bias"]
            y = y + F.silu(y @ w.T + b)
        torch.testing.assert_close(out[h], y @ sd[f"lm_heads.{h}.weight"].T)


def test_init_from_lm_head_checks_shape():
    heads = MedusaHeads(MedusaConfig.tiny())
    with pytest.raises(ValueError, match=r"\[128, 32\]"):
        heads.init_from_lm_head(torch.zeros(32, 128))
