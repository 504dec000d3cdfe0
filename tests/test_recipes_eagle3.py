"""EAGLE-3 recipes: the YAMLs say what they claim, and the 8B drafts have the serving shapes (meta device)."""

from __future__ import annotations

import copy
import inspect
from pathlib import Path

import pytest
import torch
import yaml

from spec_lightning.export.eagle3 import OPTIONAL_KEYS, REQUIRED_KEYS, eagle3_config_json
from spec_lightning.modules.eagle3 import Eagle3Module
from tests.target_configs import LLAMA_31_8B, QWEN3_8B

CONFIGS = Path(__file__).parent.parent / "configs"
EAGLE3_YAMLS = ["eagle3.yaml", "llama3.1-8b-eagle3.yaml", "qwen3-8b-eagle3.yaml"]


def raw_config(name: str) -> dict:
    raw = yaml.safe_load((CONFIGS / name).read_text())
    assert raw["model"]["class_path"] == "spec_lightning.modules.eagle3.Eagle3Module"
    return raw


@pytest.mark.parametrize("name", EAGLE3_YAMLS)
def test_recipe_model_args_are_valid(name: str) -> None:
    raw = raw_config(name)
    args = dict(raw["model"]["init_args"])
    params = inspect.signature(Eagle3Module.__init__).parameters
    assert set(args) <= set(params), set(args) - set(params)
    args.pop("optimizer", None)
    args.pop("lr_scheduler", None)
    Eagle3Module(**args)  # validates every hyperparameter (no target is loaded before configure_model)
    assert "tokenizer" not in raw["data"]["init_args"]  # linked from model.init_args.target by the CLI


def test_cpu_recipe_measures_its_precision_and_gpu_recipes_are_bf16_ddp() -> None:
    raw = raw_config("eagle3.yaml")
    # CPU recipe: bf16-mixed only where a bf16 matmul is measured fast (spec_lightning.precision), else fp32
    assert raw["trainer"]["accelerator"] == "cpu" and raw["trainer"]["precision"] == "auto"
    assert raw["model"]["init_args"]["target"] == "smollm2-135m-instruct"
    assert raw["model"]["init_args"]["target_dtype"] == "auto"
    data = raw["data"]["init_args"]["data"]
    assert set(data if isinstance(data, list) else [data]) <= {"chitchat", "chitchat-smollm2", "magpie-smollm2",
                                                                  "magpie-tasks-smollm2"}  # embedded
    assert raw["trainer"]["logger"]["class_path"].endswith("TensorBoardLogger")
    for name in ("llama3.1-8b-eagle3.yaml", "qwen3-8b-eagle3.yaml"):
        raw = raw_config(name)
        assert raw["trainer"]["precision"] == "bf16-mixed" and raw["trainer"]["strategy"] == "ddp"
        assert raw["model"]["init_args"]["target_dtype"] == "bfloat16"
        assert raw["model"]["init_args"]["ttt_length"] == 7 and raw["model"]["init_args"]["draft_vocab_size"] == 32000


def meta_module(name: str, hf_dict: dict) -> Eagle3Module:
    class MetaTarget(Eagle3Module):
        def load_target(self):
            from transformers import AutoConfig, AutoModelForCausalLM

            config = AutoConfig.for_model(**copy.deepcopy(hf_dict))  # transformers edits rope dicts in place
            with torch.device("meta"):
                model = AutoModelForCausalLM.from_config(config)
            return model.requires_grad_(False).eval()

    args = dict(raw_config(name)["model"]["init_args"])
    args.pop("optimizer")
    args.pop("lr_scheduler")
    return MetaTarget(**args)


@pytest.mark.parametrize(("name", "hf", "aux"), [
    ("llama3.1-8b-eagle3.yaml", LLAMA_31_8B, [1, 15, 28]),
    ("qwen3-8b-eagle3.yaml", QWEN3_8B, [1, 17, 32]),
])
def test_8b_draft_serving_shapes_on_meta_device(name: str, hf: dict, aux: list[int]) -> None:
    module = meta_module(name, hf)
    module.configure_model()
    draft = module.draft
    H, I, V, Vd = hf["hidden_size"], hf["intermediate_size"], hf["vocab_size"], 32000
    q, kv = hf["num_attention_heads"] * hf["head_dim"], hf["num_key_value_heads"] * hf["head_dim"]
    shapes = {k: tuple(v.shape) for k, v in draft.state_dict().items()}
    assert set(shapes) == set(REQUIRED_KEYS) | set(OPTIONAL_KEYS)
    assert shapes == {
        "embed_tokens.weight": (V, H), "fc.weight": (H, 3 * H),
        "midlayer.input_layernorm.weight": (H,), "midlayer.hidden_norm.weight": (H,),
        "midlayer.self_attn.q_proj.weight": (q, 2 * H), "midlayer.self_attn.k_proj.weight": (kv, 2 * H),
        "midlayer.self_attn.v_proj.weight": (kv, 2 * H), "midlayer.self_attn.o_proj.weight": (H, q),
        "midlayer.post_attention_layernorm.weight": (H,), "midlayer.mlp.gate_proj.weight": (I, H),
        "midlayer.mlp.up_proj.weight": (I, H), "midlayer.mlp.down_proj.weight": (H, I),
        "norm.weight": (H,), "lm_head.weight": (Vd, H), "d2t": (Vd,), "t2d": (V,),
    }
    assert draft.config.aux_layer_ids == aux
    cfg = eagle3_config_json(draft.config, torch.bfloat16)
    assert cfg["rope_theta"] == hf["rope_theta"] and cfg["max_position_embeddings"] == hf["max_position_embeddings"]
    assert cfg["rope_scaling"] == (None if hf["rope_scaling"] is None else hf["rope_scaling"])
    assert (cfg["vocab_size"], cfg["draft_vocab_size"], cfg["head_dim"]) == (V, Vd, hf["head_dim"])
    assert "eagle_aux_hidden_state_layer_ids" not in cfg  # default aux layers: the engines' defaults
    trainable = sum(p.numel() for p in module.trainable_parameters())
    assert trainable == sum(v.numel() for k, v in draft.named_parameters() if k != "embed_tokens.weight")
