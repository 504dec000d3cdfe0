"""EAGLE-3 draft network: config copied from the target, serving parameter names, RoPE, frozen embedding."""

from __future__ import annotations

import pytest
import torch

from spec_lightning.drafts.eagle3 import Eagle3Config, Eagle3Draft, flex_bucket, rope_inv_freq, shift_left
from tests.conftest import make_tiny_llama


def test_config_copies_target_shape_and_rope() -> None:
    from transformers import LlamaConfig

    hf = LlamaConfig(vocab_size=1000, hidden_size=64, intermediate_size=96, num_hidden_layers=12,
                     num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=131072, rms_norm_eps=1e-5,
                     rope_theta=500000.0, rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                                        "high_freq_factor": 4.0,
                                                        "original_max_position_embeddings": 8192})
    cfg = Eagle3Config.from_target_config(hf, draft_vocab_size=100)
    assert (cfg.hidden_size, cfg.intermediate_size, cfg.num_attention_heads, cfg.num_key_value_heads,
            cfg.head_dim) == (64, 96, 8, 2, 8)
    assert cfg.rope_theta == 500000.0 and cfg.rope_scaling["rope_type"] == "llama3"
    assert cfg.rope_scaling["factor"] == 8.0 and "rope_theta" not in cfg.rope_scaling
    assert cfg.max_position_embeddings == 131072 and cfg.rms_norm_eps == 1e-5
    assert cfg.vocab_size == 1000 and cfg.draft_vocab_size == 100
    assert cfg.aux_layer_ids == [1, 5, 8]  # SPEC §3.1: [1, N//2 - 1, N - 4]
    # plain RoPE -> no scaling dict
    tiny = Eagle3Config.from_target_config(make_tiny_llama().config, draft_vocab_size=64)
    assert tiny.rope_theta == 50000.0 and tiny.rope_scaling is None
    # a draft vocab larger than V is clipped to V (identity mapping)
    assert Eagle3Config.from_target_config(make_tiny_llama().config, draft_vocab_size=32000).draft_vocab_size == 128


def test_llama3_rope_matches_transformers() -> None:
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    scaling = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 64}
    hf = LlamaConfig(hidden_size=256, num_attention_heads=2, num_hidden_layers=6, rope_theta=500000.0,
                     rope_scaling=scaling, max_position_embeddings=512)
    expected, _ = ROPE_INIT_FUNCTIONS["llama3"](hf, torch.device("cpu"))
    ours, scale = rope_inv_freq(Eagle3Config.from_target_config(hf, draft_vocab_size=16))
    assert scale == 1.0
    torch.testing.assert_close(ours, expected.float())


def test_bad_config_values_are_named() -> None:
    with pytest.raises(ValueError, match="num_key_value_heads"):
        Eagle3Config.tiny(num_attention_heads=4, num_key_value_heads=3)
    with pytest.raises(ValueError, match="draft_vocab_size"):
        Eagle3Config.tiny(draft_vocab_size=1000)
    with pytest.raises(ValueError, match="aux layer id 5"):
        Eagle3Config.tiny(aux_layer_ids=[1, 5])
    with pytest.raises(ValueError, match="rope_theta"):
        Eagle3Config.from_target_config(type("C", (), {"rope_theta": None, "num_hidden_layers": 6})(), 8)


def test_parameter_names_and_shapes_are_the_serving_names() -> None:
    cfg = Eagle3Config.tiny()
    H, V, Vd = cfg.hidden_size, cfg.vocab_size, cfg.draft_vocab_size
    shapes = {k: tuple(v.shape) for k, v in Eagle3Draft(cfg).state_dict().items()}
    assert shapes == {
        "embed_tokens.weight": (V, H), "fc.weight": (H, 3 * H),
        "midlayer.input_layernorm.weight": (H,), "midlayer.hidden_norm.weight": (H,),
        "midlayer.self_attn.q_proj.weight": (4 * 8, 2 * H), "midlayer.self_attn.k_proj.weight": (2 * 8, 2 * H),
        "midlayer.self_attn.v_proj.weight": (2 * 8, 2 * H), "midlayer.self_attn.o_proj.weight": (H, 4 * 8),
        "midlayer.post_attention_layernorm.weight": (H,), "midlayer.mlp.gate_proj.weight": (64, H),
        "midlayer.mlp.up_proj.weight": (64, H), "midlayer.mlp.down_proj.weight": (H, 64),
        "norm.weight": (H,), "lm_head.weight": (Vd, H), "d2t": (Vd,), "t2d": (V,),
    }
    two = Eagle3Draft(Eagle3Config.tiny(num_layers=2)).state_dict()
    assert two["extra_layers.0.self_attn.q_proj.weight"].shape == (32, H)  # later layers take H, not 2H
    assert "extra_layers.0.hidden_norm.weight" not in two


def test_embedding_is_frozen() -> None:
    draft = Eagle3Draft(Eagle3Config.tiny())
    assert not draft.embed_tokens.weight.requires_grad
    assert all(p.requires_grad for n, p in draft.named_parameters() if n != "embed_tokens.weight")


def test_shift_left_on_a_hand_built_sequence() -> None:
    x = torch.tensor([[10, 11, 12, 13, 14]])
    assert shift_left(x, 1).tolist() == [[11, 12, 13, 14, 0]]
    assert shift_left(x, 3).tolist() == [[13, 14, 0, 0, 0]]
    assert shift_left(x, 9).tolist() == [[0, 0, 0, 0, 0]]


@pytest.mark.parametrize("T", [8, 130])  # padded to flex's 128- and 256-token buckets
def test_flex_backend_matches_eager_forward(T: int) -> None:
    """flex_attention runs forward-only on CPU (no CPU backward), so only the forward is checked here."""
    pytest.importorskip("torch.nn.attention.flex_attention")
    torch.manual_seed(0)
    draft = Eagle3Draft(Eagle3Config.tiny())
    aux, ids = torch.randn(2, T, 96), torch.randint(0, 128, (2, T))
    mask = torch.tensor([[1] * T, [1] * (T - 3) + [0] * 3])
    with torch.no_grad():
        eager = draft(aux, ids, mask, ttt_length=3)
        try:
            flex = draft(aux, ids, mask, ttt_length=3, backend="flex")
        except (RuntimeError, NotImplementedError) as e:  # pragma: no cover - depends on the torch build
            pytest.skip(f"flex_attention unavailable on this CPU build: {e}")
    for a, b in zip(eager, flex, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_flex_buckets_are_powers_of_two_from_one_block() -> None:
    assert [flex_bucket(t) for t in (1, 127, 128, 129, 256, 257, 2048)] == [128, 128, 128, 256, 256, 512, 2048]
