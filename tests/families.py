"""Tiny random targets of the common causal-LM families, built in code (nothing loads from a hub).

Each family is a :class:`Family` with a builder and a note saying what makes it special for a draft-training
library (where its decoder layers live, its final norm, its logit post-processing, its attention windows, its
RoPE). All models are ~64 hidden, 6 layers (EAGLE-3's default aux layers need >= 5), 4 heads / 2 KV heads where
the family has GQA, vocab 256, >= 512 positions, float32, ``eval()``, frozen and seeded.

Why the output head is rescaled: with HF's default init (std 0.02) the logits of a 64-wide model are ~0.15, so a
softcap of 5 or a division by 8 would barely change the distribution and a test could not tell whether the logit
post-processing was applied. :func:`_rescale_lm_head` sets the lm_head rows so the raw logits have std ~4 (a real
8B model's logits have std of a few units too), which makes every post-processing below change the distribution
measurably (the layout tests assert that).

Sliding windows are short (16, or 32 for Phi-3) so a 40-token test sequence crosses them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

HIDDEN, LAYERS, HEADS, KV_HEADS, VOCAB, MAX_POS = 64, 6, 4, 2, 256, 512
WINDOW = 16
LOGIT_STD = 4.0


@dataclass(frozen=True)
class Family:
    """One tiny target family.

    build: returns a fresh, seeded, frozen fp32 model in eval mode.
    note: what is special about the family (layout, norm, logits, windows, RoPE), for readers of the tests.
    logit_postprocessing: True when ``model(ids).logits`` is NOT plain ``lm_head(final_hidden)``.
    sliding: True when at least one decoder layer attends through a sliding window.
    """

    build: Callable[[], nn.Module]
    note: str
    logit_postprocessing: bool = False
    sliding: bool = False


def _common(**overrides) -> dict:
    """Shape kwargs shared by the Llama-like configs."""
    kwargs = dict(
        vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=2 * HIDDEN, num_hidden_layers=LAYERS,
        num_attention_heads=HEADS, num_key_value_heads=KV_HEADS, max_position_embeddings=MAX_POS,
        pad_token_id=0, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False,
    )
    kwargs.update(overrides)
    return kwargs


def _rescale_lm_head(model: nn.Module, std: float = LOGIT_STD, seed: int = 1) -> None:
    """Redraw the output-embedding rows so raw logits have std ~``std`` (post-norm hidden entries are ~1).

    For tied models this also rescales the input embedding; every family normalises before its first
    attention, so the network stays well-behaved.
    """
    head = model.get_output_embeddings()
    g = torch.Generator().manual_seed(seed)
    hidden = head.weight.shape[1]
    with torch.no_grad():
        head.weight.copy_(torch.randn(head.weight.shape, generator=g) * (std / hidden**0.5))


def _finish(model: nn.Module) -> nn.Module:
    _rescale_lm_head(model)
    model = model.float().eval()
    model.requires_grad_(False)
    return model


def _build(config_cls: str, model_cls: str, seed: int = 0, **config_kwargs) -> nn.Module:
    import transformers

    config = getattr(transformers, config_cls)(**config_kwargs)
    torch.manual_seed(seed)
    return _finish(getattr(transformers, model_cls)(config))


def llama() -> nn.Module:
    return _build("LlamaConfig", "LlamaForCausalLM", rope_parameters={"rope_type": "default", "rope_theta": 50000.0},
                  **_common())


def llama_tied() -> nn.Module:
    return _build("LlamaConfig", "LlamaForCausalLM", rope_parameters={"rope_type": "default", "rope_theta": 50000.0},
                  **_common(tie_word_embeddings=True))


def llama3_rope() -> nn.Module:
    rope = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 64}
    return _build("LlamaConfig", "LlamaForCausalLM", rope_parameters=rope, **_common())


def qwen2() -> nn.Module:
    return _build("Qwen2Config", "Qwen2ForCausalLM", rope_parameters={"rope_type": "default", "rope_theta": 1e6},
                  **_common())


def qwen2_swa() -> nn.Module:
    # use_sliding_window + max_window_layers=3: layers 0-2 full, 3-5 sliding (Qwen2Config.__post_init__ layer_types).
    return _build("Qwen2Config", "Qwen2ForCausalLM", rope_parameters={"rope_type": "default", "rope_theta": 1e6},
                  use_sliding_window=True, sliding_window=WINDOW, max_window_layers=3, **_common())


def qwen3() -> nn.Module:
    return _build("Qwen3Config", "Qwen3ForCausalLM", rope_parameters={"rope_type": "default", "rope_theta": 1e6},
                  head_dim=16, **_common())


def qwen3_moe() -> nn.Module:
    return _build("Qwen3MoeConfig", "Qwen3MoeForCausalLM",
                  rope_parameters={"rope_type": "default", "rope_theta": 1e6}, head_dim=16, num_experts=4,
                  num_experts_per_tok=2, moe_intermediate_size=32, decoder_sparse_step=1, norm_topk_prob=True,
                  **_common())


def mixtral() -> nn.Module:
    return _build("MixtralConfig", "MixtralForCausalLM", rope_parameters={"rope_type": "default", "rope_theta": 1e6},
                  num_local_experts=4, num_experts_per_tok=2, sliding_window=None, **_common())


def mistral() -> nn.Module:
    return _build("MistralConfig", "MistralForCausalLM",
                  rope_parameters={"rope_type": "default", "rope_theta": 10000.0}, sliding_window=WINDOW,
                  **_common())


def gemma2() -> nn.Module:
    return _build("Gemma2Config", "Gemma2ForCausalLM", rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
                  head_dim=16, query_pre_attn_scalar=16, sliding_window=WINDOW, final_logit_softcapping=5.0,
                  attn_logit_softcapping=50.0, hidden_activation="gelu_pytorch_tanh",
                  **_common(tie_word_embeddings=True))


def gemma3() -> nn.Module:
    rope = {"full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1e6},
            "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0}}
    layer_types = ["sliding_attention", "sliding_attention", "full_attention"] * 2
    return _build("Gemma3TextConfig", "Gemma3ForCausalLM", rope_parameters=rope, layer_types=layer_types,
                  head_dim=16, query_pre_attn_scalar=16, sliding_window=WINDOW,
                  **_common(tie_word_embeddings=True))


def phi3() -> nn.Module:
    return _build("Phi3Config", "Phi3ForCausalLM",
                  rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5},
                  sliding_window=2 * WINDOW, **_common())


def gpt_neox() -> nn.Module:
    return _build("GPTNeoXConfig", "GPTNeoXForCausalLM",
                  rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.25},
                  vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=4 * HIDDEN, num_hidden_layers=LAYERS,
                  num_attention_heads=HEADS, max_position_embeddings=MAX_POS, use_parallel_residual=True,
                  tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)


def granite() -> nn.Module:
    return _build("GraniteConfig", "GraniteForCausalLM", rope_parameters={"rope_type": "default", "rope_theta": 1e4},
                  logits_scaling=8.0, embedding_multiplier=12.0, residual_multiplier=0.22,
                  attention_multiplier=1 / 16, **_common())


def cohere() -> nn.Module:
    return _build("CohereConfig", "CohereForCausalLM", rope_parameters={"rope_type": "default", "rope_theta": 1e4},
                  logit_scale=0.0625, use_qk_norm=False, **_common(tie_word_embeddings=True))


def gpt2() -> nn.Module:
    return _build("GPT2Config", "GPT2LMHeadModel", vocab_size=VOCAB, n_embd=HIDDEN, n_layer=LAYERS, n_head=HEADS,
                  n_positions=MAX_POS, bos_token_id=1, eos_token_id=2)


FAMILIES: dict[str, Family] = {
    "llama": Family(llama, "model.layers, model.norm (RMSNorm), plain lm_head, global RoPE theta 5e4"),
    "llama_tied": Family(llama_tied, "as llama, lm_head tied to embed_tokens"),
    "llama3_rope": Family(llama3_rope, "as llama, rope_parameters llama3 scaling (theta 5e5, factor 8)"),
    "qwen2": Family(qwen2, "Llama layout with qkv bias; use_sliding_window off (all full attention)"),
    "qwen2_swa": Family(qwen2_swa, "Qwen2 use_sliding_window=True, max_window_layers=3: layers 3-5 window 16",
                        sliding=True),
    "qwen3": Family(qwen3, "Llama layout with q/k RMSNorm and explicit head_dim 16"),
    "qwen3_moe": Family(qwen3_moe, "sparse MoE MLP (4 experts, top-2), layer outputs are tensors"),
    "mixtral": Family(mixtral, "sparse MoE block_sparse_moe (4 experts, top-2), no window"),
    "mistral": Family(mistral, "Llama layout, ONE global sliding_window=16 for every layer (no layer_types)",
                      sliding=True),
    "gemma2": Family(gemma2, "(1+w) RMSNorm, sqrt(H) embed scale, layers alternate sliding(16)/full, "
                             "final_logit_softcapping=5, attn softcap, eager attention", logit_postprocessing=True,
                     sliding=True),
    "gemma3": Family(gemma3, "Gemma3ForCausalLM (text): layer_types s,s,f,s,s,f, per-layer-type RoPE "
                             "(full: theta 1e6 linear x8, sliding: theta 1e4), window 16", sliding=True),
    "phi3": Family(phi3, "fused qkv_proj / gate_up_proj, partial_rotary_factor 0.5, global sliding_window=32",
                   sliding=True),
    "gpt_neox": Family(gpt_neox, "gpt_neox.layers, final_layer_norm (LayerNorm), head is lm_head (embed_out in 4.x), "
                                 "rotary_pct 0.25, parallel residual, no GQA"),
    "granite": Family(granite, "Llama layout with multipliers; logits divided by logits_scaling=8",
                      logit_postprocessing=True),
    "cohere": Family(cohere, "LayerNorm without bias, parallel attn/mlp, tied, logits multiplied by "
                             "logit_scale=0.0625", logit_postprocessing=True),
    "gpt2": Family(gpt2, "transformer.h, transformer.ln_f (LayerNorm), absolute learned positions (no RoPE), "
                         "Conv1D projections, tied lm_head"),
}


def gemma3_multimodal() -> nn.Module:
    """A tiny ``Gemma3ForConditionalGeneration`` (SigLIP tower + Gemma-3 text decoder): the text decoder is
    nested at ``model.language_model`` and the config's text part at ``config.text_config``."""
    import transformers

    text = dict(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=2 * HIDDEN, num_hidden_layers=LAYERS,
                num_attention_heads=HEADS, num_key_value_heads=KV_HEADS, head_dim=16, query_pre_attn_scalar=16,
                max_position_embeddings=MAX_POS, sliding_window=WINDOW, final_logit_softcapping=5.0,
                layer_types=["sliding_attention", "sliding_attention", "full_attention"] * 2,
                rope_parameters={"full_attention": {"rope_type": "default", "rope_theta": 1e6},
                                 "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0}})
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=32,
                  patch_size=8)
    config = transformers.Gemma3Config(text_config=text, vision_config=vision, mm_tokens_per_image=4,
                                       image_token_index=VOCAB - 1, boi_token_index=VOCAB - 2,
                                       eoi_token_index=VOCAB - 3)
    torch.manual_seed(0)
    return _finish(transformers.Gemma3ForConditionalGeneration(config))


# Multimodal wrappers whose text decoder is nested (kept apart from FAMILIES: they are not plain causal LMs).
MULTIMODAL: dict[str, Family] = {
    # text_config sets final_logit_softcapping=5, but Gemma3ForConditionalGeneration.forward (transformers 5.24)
    # returns raw lm_head logits, unlike Gemma3ForCausalLM: layout.output_logits follows the class.
    "gemma3_mm": Family(gemma3_multimodal, "Gemma3ForConditionalGeneration: model.language_model.layers, "
                                           "text_config, softcap in config but not applied by this class",
                        logit_postprocessing=False, sliding=True),
}
