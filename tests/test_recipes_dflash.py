"""DFlash recipes: the YAMLs say what they claim, and the Qwen3-8B draft has the reference drafts' shape (meta device).

The reference: SpecForge's ``configs/qwen3-8b-dflash.json`` and z-lab's released ``Qwen3-8B-DFlash-b16`` (5 Qwen3
layers of the target's width, block size 16, 36 target layers, features of layers [1, 9, 17, 25, 33])."""

from __future__ import annotations

import copy
import inspect
from pathlib import Path

import pytest
import torch
import yaml

from spec_lightning.drafts.dflash import default_target_layer_ids
from spec_lightning.export.dflash import dflash_config_json, required_keys
from spec_lightning.modules.dflash import DFlashModule
from tests.target_configs import QWEN3_8B

CONFIGS = Path(__file__).parent.parent / "configs"
DFLASH_YAMLS = ["dflash.yaml", "qwen3-8b-dflash.yaml"]


def raw_config(name: str) -> dict:
    raw = yaml.safe_load((CONFIGS / name).read_text())
    assert raw["model"]["class_path"] == "spec_lightning.modules.dflash.DFlashModule"
    return raw


@pytest.mark.parametrize("name", DFLASH_YAMLS)
def test_recipe_model_args_are_valid(name: str) -> None:
    args = dict(raw_config(name)["model"]["init_args"])
    assert set(args) <= set(inspect.signature(DFlashModule.__init__).parameters)
    args.pop("optimizer", None)
    args.pop("lr_scheduler", None)
    DFlashModule(**args)  # validates every hyperparameter (no target is loaded before configure_model)


def test_gpu_recipe_is_the_eagle3_recipes_trainer_and_data_with_specforges_dflash_settings() -> None:
    raw, eagle3 = raw_config("qwen3-8b-dflash.yaml"), yaml.safe_load((CONFIGS / "qwen3-8b-eagle3.yaml").read_text())
    args = raw["model"]["init_args"]
    assert (args["target"], args["target_dtype"]) == ("Qwen/Qwen3-8B", "bfloat16")
    settings = ("block_size", "num_draft_layers", "num_anchors", "loss_decay_gamma")
    assert tuple(args[k] for k in settings) == (16, 5, 512, 7.0)
    assert args["target_layer_ids"] == default_target_layer_ids(36, 5) == [1, 9, 17, 25, 33]
    assert args["optimizer"]["init_args"]["lr"] == 6.0e-4 and raw["trainer"]["gradient_clip_val"] == 1.0
    assert raw["data"] == eagle3["data"]
    same = {k: v for k, v in eagle3["trainer"].items() if k not in ("logger", "gradient_clip_val")}
    assert {k: raw["trainer"][k] for k in same} == same  # devices, ddp, bf16-mixed, epochs, validation cadence


def test_qwen3_8b_draft_has_the_reference_shape_on_meta_device() -> None:
    class MetaTarget(DFlashModule):
        def load_target(self):
            from transformers import AutoConfig, AutoModelForCausalLM

            config = AutoConfig.for_model(**copy.deepcopy(QWEN3_8B))
            with torch.device("meta"):
                model = AutoModelForCausalLM.from_config(config)
            return model.requires_grad_(False).eval()

    args = dict(raw_config("qwen3-8b-dflash.yaml")["model"]["init_args"])
    args.pop("optimizer")
    args.pop("lr_scheduler")
    module = MetaTarget(**args)
    module.configure_model()
    draft, hf = module.draft, QWEN3_8B
    H, I, q, kv = hf["hidden_size"], hf["intermediate_size"], 32 * 128, 8 * 128
    shapes = {k: tuple(v.shape) for k, v in draft.state_dict().items()}
    assert set(shapes) == set(required_keys(draft.config)) | {"mask_embedding"}
    assert shapes["fc.weight"] == (H, 5 * H) and shapes["mask_embedding"] == (H,)
    for i in range(5):
        assert shapes[f"layers.{i}.self_attn.q_proj.weight"] == (q, H)
        assert shapes[f"layers.{i}.self_attn.k_proj.weight"] == shapes[f"layers.{i}.self_attn.v_proj.weight"] == (kv, H)
        assert shapes[f"layers.{i}.mlp.gate_proj.weight"] == (I, H)
        assert shapes[f"layers.{i}.mlp.down_proj.weight"] == (H, I)
    cfg = dflash_config_json(draft.config, torch.bfloat16)
    reference = {  # SpecForge configs/qwen3-8b-dflash.json (the fields a loader reads)
        "architectures": ["DFlashDraftModel"], "model_type": "qwen3", "block_size": 16, "head_dim": 128,
        "hidden_act": "silu", "hidden_size": 4096, "intermediate_size": 12288, "max_position_embeddings": 40960,
        "num_attention_heads": 32, "num_hidden_layers": 5, "num_key_value_heads": 8, "num_target_layers": 36,
        "rms_norm_eps": 1e-06, "rope_scaling": None, "rope_theta": 1000000, "tie_word_embeddings": False,
        "attention_bias": False, "vocab_size": 151936, "torch_dtype": "bfloat16",
    }
    assert {k: cfg[k] for k in reference} == reference
    assert cfg["dflash_config"]["target_layer_ids"] == [1, 9, 17, 25, 33]
    assert cfg["dflash_config"]["mask_token_id"] == 151935  # the last (unused padding) row; our mask_embedding.pt
    # the recipe's memory note: ~1.05 B trainable parameters, none of the target's
    trainable = sum(p.numel() for p in module.trainable_parameters())
    assert trainable == sum(v.numel() for v in draft.parameters())
    assert 1.0e9 < trainable < 1.1e9, trainable
