"""Medusa export: vLLM and original FasterDecoding layouts, exact round trips, refusal of incomplete heads."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from spec_lightning.drafts.medusa import MedusaConfig, MedusaHeads
from spec_lightning.export.medusa import load_medusa_heads, read_medusa, write_medusa
from spec_lightning.modules.medusa1 import Medusa1Module
from tests.conftest import make_tiny_llama

CFG = MedusaConfig(hidden_size=32, vocab_size=128, num_heads=2, num_layers=2)


def random_heads(seed: int = 0, cfg: MedusaConfig = CFG) -> MedusaHeads:
    torch.manual_seed(seed)
    heads = MedusaHeads(cfg)
    for p in heads.parameters():
        nn.init.normal_(p, std=0.1)
    return heads


class FasterDecodingResBlock(nn.Module):
    """The original Medusa ResBlock (medusa/model/medusa_model.py), reimplemented for the layout check."""

    def __init__(self, hidden_size: int) -> None:
        super().__init__()
        self.linear = nn.Linear(hidden_size, hidden_size)
        self.act = nn.SiLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.act(self.linear(x))


def faster_decoding_heads(cfg: MedusaConfig) -> nn.ModuleList:
    # separate instances here (the original repeats one ResBlock instance; the names are the same)
    return nn.ModuleList(
        nn.Sequential(*[FasterDecodingResBlock(cfg.hidden_size) for _ in range(cfg.num_layers)],
                      nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False))
        for _ in range(cfg.num_heads)
    )


@pytest.mark.parametrize("layout", ["vllm", "original"])
def test_export_reload_gives_identical_logits(tmp_path, layout):
    heads = random_heads()
    out = write_medusa(tmp_path / layout, heads.state_dict(), CFG, layout=layout, base_model_name_or_path="base/x")
    config, _, detected = read_medusa(out)
    assert detected == layout and config == CFG
    reloaded = load_medusa_heads(out)
    x = torch.randn(2, 5, 32)
    assert torch.equal(reloaded(x), heads(x))


def test_vllm_layout_files_and_config(tmp_path):
    out = write_medusa(tmp_path / "m", random_heads().state_dict(), CFG, layout="vllm")
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors", "spec_lightning_export.json"]
    cfg = json.loads((out / "config.json").read_text())
    assert cfg == {
        "architectures": ["MedusaModel"], "model_type": "medusa", "hidden_size": 32, "vocab_size": 128,
        "truncated_vocab_size": 128, "num_heads": 2, "num_hidden_layers": 2, "medusa_fc_bias": True,
    }
    assert "num_attention_heads" not in cfg and "num_key_value_heads" not in cfg
    # vLLM's MedusaConfig.from_pretrained renames every "num"+"heads" key to num_heads: nothing may clobber K
    renamed = dict(cfg)
    for k in list(renamed):
        if "num" in k and "heads" in k:
            renamed["num_heads"] = renamed.pop(k)
        elif "num" in k and "layers" in k:
            renamed["num_hidden_layers"] = renamed.pop(k)
    assert renamed["num_heads"] == 2 and renamed["num_hidden_layers"] == 2
    shapes = {k: tuple(v.shape) for k, v in load_file(str(out / "model.safetensors")).items()}
    assert shapes == {
        "blocks.0.layers.0.weight": (32, 32), "blocks.0.layers.0.bias": (32,),
        "blocks.0.layers.1.weight": (32, 32), "blocks.0.layers.1.bias": (32,),
        "blocks.1.layers.0.weight": (32, 32), "blocks.1.layers.0.bias": (32,),
        "blocks.1.layers.1.weight": (32, 32), "blocks.1.layers.1.bias": (32,),
        "lm_heads.0.weight": (128, 32), "lm_heads.1.weight": (128, 32),
    }


def test_original_layout_loads_into_faster_decoding_module(tmp_path):
    heads = random_heads(seed=1)
    out = write_medusa(tmp_path / "o", heads.state_dict(), CFG, layout="original", base_model_name_or_path="b/m")
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "medusa_lm_head.safetensors", "spec_lightning_export.json"]
    cfg = json.loads((out / "config.json").read_text())
    assert cfg == {"medusa_num_heads": 2, "medusa_num_layers": 2, "base_model_name_or_path": "b/m",
                   "hidden_size": 32, "vocab_size": 128}
    state = load_file(str(out / "medusa_lm_head.safetensors"))
    assert sorted(state) == sorted([
        "0.0.linear.weight", "0.0.linear.bias", "0.1.linear.weight", "0.1.linear.bias", "0.2.weight",
        "1.0.linear.weight", "1.0.linear.bias", "1.1.linear.weight", "1.1.linear.bias", "1.2.weight",
    ])
    original = faster_decoding_heads(CFG)
    original.load_state_dict(state, strict=True)
    x = torch.randn(3, 32)
    with torch.no_grad():
        ref = torch.stack([head(x) for head in original])
        torch.testing.assert_close(heads(x), ref, rtol=0, atol=0)


def test_writer_refuses_missing_key_and_keeps_existing_dir(tmp_path):
    out = write_medusa(tmp_path / "m", random_heads().state_dict(), CFG)
    before = (out / "model.safetensors").read_bytes()
    state = random_heads(seed=2).state_dict()
    del state["blocks.1.layers.1.bias"]
    with pytest.raises(ValueError, match=r"missing \['blocks\.1\.layers\.1\.bias'\]"):
        write_medusa(out, state, CFG)
    assert (out / "model.safetensors").read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["m"]  # no temp dir left behind


def test_writer_refuses_wrong_shapes_extra_keys_and_layouts(tmp_path):
    state = random_heads().state_dict()
    with pytest.raises(ValueError, match="unexpected keys"):
        write_medusa(tmp_path / "a", {**state, "blocks.2.layers.0.weight": torch.zeros(32, 32)}, CFG)
    with pytest.raises(ValueError, match="wrong shapes"):
        write_medusa(tmp_path / "b", {**state, "lm_heads.0.weight": torch.zeros(127, 32)}, CFG)
    with pytest.raises(ValueError, match="layout"):
        write_medusa(tmp_path / "c", state, CFG, layout="tgi")
    assert not any(tmp_path.iterdir())


def test_reader_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no Medusa weights"):
        load_medusa_heads(tmp_path)
    out = write_medusa(tmp_path / "o", random_heads().state_dict(), CFG, layout="original")
    cfg = json.loads((out / "config.json").read_text())
    del cfg["medusa_num_layers"]
    (out / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="medusa_num_layers"):
        load_medusa_heads(out)


class TinyMedusa(Medusa1Module):
    def load_target(self):
        return make_tiny_llama(num_layers=2, seed=0)


@pytest.mark.parametrize("layout", ["vllm", "original"])
def test_module_export_draft_round_trip(tmp_path, layout):
    module = TinyMedusa(num_heads=3, num_layers=1)
    module.configure_model()
    with torch.no_grad():
        for p in module.heads.parameters():
            p.add_(0.01 * torch.randn_like(p))
    out = module.export_draft(str(tmp_path / "draft"), layout=layout)
    ids = torch.randint(3, 128, (2, 7))
    with torch.no_grad():
        hidden = module.target(ids).final_hidden
        assert torch.equal(load_medusa_heads(out)(hidden), module(ids))
    if layout == "original":
        assert json.loads((out / "config.json").read_text())["base_model_name_or_path"] == "smollm2-135m-instruct"
