"""EAGLE-3 export (SPEC §5): exact key set, refusal of incomplete state dicts, config fields, exact round trip."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open

from spec_lightning.drafts.eagle3 import Eagle3Config, Eagle3Draft
from spec_lightning.export.eagle3 import load_eagle3_draft, write_eagle3
from spec_lightning.modules.eagle3 import Eagle3Module
from spec_lightning.vocab import vocab_from_token_ids
from tests.conftest import make_tiny_llama

# SPEC §5, written out independently of the exporter's own list
SPEC_KEYS = {
    "fc.weight", "midlayer.self_attn.q_proj.weight", "midlayer.self_attn.k_proj.weight",
    "midlayer.self_attn.v_proj.weight", "midlayer.self_attn.o_proj.weight", "midlayer.mlp.gate_proj.weight",
    "midlayer.mlp.up_proj.weight", "midlayer.mlp.down_proj.weight", "midlayer.input_layernorm.weight",
    "midlayer.hidden_norm.weight", "midlayer.post_attention_layernorm.weight", "norm.weight", "lm_head.weight",
    "d2t", "t2d",
}


def trained_like_draft(seed: int = 0, **cfg) -> Eagle3Draft:
    torch.manual_seed(seed)
    draft = Eagle3Draft(Eagle3Config.tiny(**cfg))
    vocab = vocab_from_token_ids(torch.randperm(128)[:64], 128)
    draft.set_vocab(vocab.d2t, vocab.t2d)
    with torch.no_grad():
        for p in draft.parameters():
            p.normal_(0, 0.2)
    return draft


def test_exported_keys_are_exactly_the_spec_list(tmp_path) -> None:
    draft = trained_like_draft()
    out = write_eagle3(tmp_path / "d", draft.state_dict(), draft.config)
    with safe_open(str(out / "model.safetensors"), framework="pt") as f:
        keys = set(f.keys())
        assert keys == SPEC_KEYS | {"embed_tokens.weight"}
        assert f.get_tensor("d2t").dtype == torch.int64 and f.get_tensor("t2d").dtype == torch.bool
        assert tuple(f.get_tensor("fc.weight").shape) == (32, 96)
        assert tuple(f.get_tensor("midlayer.self_attn.q_proj.weight").shape) == (32, 64)  # [*, 2H]
        assert tuple(f.get_tensor("lm_head.weight").shape) == (64, 32)
    out2 = write_eagle3(tmp_path / "e", draft.state_dict(), draft.config, include_embeddings=False)
    with safe_open(str(out2 / "model.safetensors"), framework="pt") as f:
        assert set(f.keys()) == SPEC_KEYS


def test_export_reload_gives_identical_logits(tmp_path) -> None:
    draft = trained_like_draft()
    write_eagle3(tmp_path / "d", draft.state_dict(), draft.config)
    again = load_eagle3_draft(tmp_path / "d")
    assert again.config == draft.config
    for k, v in draft.state_dict().items():
        assert torch.equal(again.state_dict()[k], v), k
    aux, ids = torch.randn(2, 7, 96), torch.randint(0, 128, (2, 7))
    with torch.no_grad():
        for a, b in zip(draft(aux, ids, ttt_length=3), again(aux, ids, ttt_length=3), strict=True):
            assert torch.equal(a, b)


def test_writer_refuses_missing_or_unknown_keys(tmp_path) -> None:
    draft = trained_like_draft()
    state = draft.state_dict()
    del state["midlayer.hidden_norm.weight"], state["d2t"]
    with pytest.raises(ValueError, match=r"missing required keys.*midlayer.hidden_norm.weight.*d2t"):
        write_eagle3(tmp_path / "d", state, draft.config)
    assert not (tmp_path / "d").exists()
    state = draft.state_dict()
    state["layers.0.mlp.up_proj.weight"] = state["midlayer.mlp.up_proj.weight"]
    with pytest.raises(ValueError, match="unexpected keys"):
        write_eagle3(tmp_path / "d", state, draft.config)


def test_config_json_fields_and_default_aux_ids(tmp_path) -> None:
    scaling = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 64}
    draft = trained_like_draft(rope_theta=500000.0, rope_scaling=scaling, max_position_embeddings=131072)
    cfg = json.loads((write_eagle3(tmp_path / "d", draft.state_dict(), draft.config) / "config.json").read_text())
    assert cfg["architectures"] == ["LlamaForCausalLMEagle3"] and cfg["model_type"] == "llama"
    assert cfg["rope_theta"] == 500000.0 and cfg["rope_scaling"] == scaling
    assert cfg["max_position_embeddings"] == 131072
    assert (cfg["vocab_size"], cfg["draft_vocab_size"], cfg["tie_word_embeddings"]) == (128, 64, False)
    assert (cfg["num_hidden_layers"], cfg["hidden_size"], cfg["head_dim"]) == (1, 32, 8)
    # default aux layers ([1, 2, 2] for a 6-layer target): neither engine key is written
    assert "eagle_aux_hidden_state_layer_ids" not in cfg and "eagle_config" not in cfg


def test_non_default_aux_ids_written_in_both_numberings(tmp_path) -> None:
    draft = trained_like_draft(aux_layer_ids=[0, 2, 3])
    out = write_eagle3(tmp_path / "d", draft.state_dict(), draft.config)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["eagle_aux_hidden_state_layer_ids"] == [1, 3, 4]  # vLLM: HF hidden_states[layer id + 1]
    assert cfg["eagle_config"]["eagle_aux_hidden_state_layer_ids"] == [0, 2, 3]  # SGLang: output of layer j
    assert load_eagle3_draft(out).config.aux_layer_ids == [0, 2, 3]


def test_module_export_copies_target_rope_and_max_positions(tmp_path) -> None:
    class Tiny(Eagle3Module):
        def load_target(self):
            return make_tiny_llama(max_pos=4096)

    module = Tiny(draft_vocab_size=64, ttt_length=2)
    out = module.export_draft(str(tmp_path / "x"))
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["rope_theta"] == 50000.0 and cfg["max_position_embeddings"] == 4096 and cfg["rope_scaling"] is None
    reloaded = load_eagle3_draft(out)
    assert torch.equal(reloaded.embed_tokens.weight, make_tiny_llama().get_input_embeddings().weight)
    with pytest.raises(ValueError, match="layout"):
        module.export_draft(str(tmp_path / "y"), layout="fasterdecoding")


def test_multi_layer_drafts_are_refused_for_serving(tmp_path) -> None:
    draft = trained_like_draft(num_layers=2)
    with pytest.raises(ValueError, match="unexpected keys|one decoder layer"):
        write_eagle3(tmp_path / "d", draft.state_dict(), draft.config)
