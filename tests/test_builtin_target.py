"""End-to-end checks on the embedded SmolLM2 target (slow: conversion on a fresh machine takes ~20 s)."""

import time

import pytest
import torch

from spec_lightning.targets import FrozenTarget, load_target_model, load_tokenizer

pytestmark = pytest.mark.slow


def test_builtin_smollm2_loads_and_matches_spec_shapes():
    load_target_model("smollm2-135m-instruct")  # converts once if needed
    start = time.perf_counter()
    model = load_target_model("smollm2-135m-instruct")
    elapsed = time.perf_counter() - start
    cfg = model.config
    assert (cfg.num_hidden_layers, cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads,
            cfg.vocab_size) == (30, 576, 9, 3, 49152)
    assert elapsed < 30  # generous bound; the measured figure (0.25 s) is in the README's first-run table
    tok = load_tokenizer("smollm2-135m-instruct")
    msgs = [{"role": "user", "content": "What is the capital of France?"}]
    enc = tok.apply_chat_template(msgs, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    out = model.generate(**enc, max_new_tokens=8, do_sample=False)
    assert "Paris" in tok.decode(out[0, enc["input_ids"].shape[1]:])  # dequantised weights are sane


def test_builtin_capture_matches_hidden_states():
    model = load_target_model("smollm2-135m-instruct")
    ids = torch.tensor([[1, 4093, 198, 1780, 314, 260, 3575]])
    feats = FrozenTarget(model)(ids, aux_layer_ids=[1, 14, 26], return_logits=True)
    hs = model(input_ids=ids, output_hidden_states=True).hidden_states
    torch.testing.assert_close(feats.aux_hidden, torch.cat([hs[2], hs[15], hs[27]], -1))
    torch.testing.assert_close(feats.final_hidden, hs[30])
