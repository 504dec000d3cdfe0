"""Medusa recipes: the YAMLs say what they claim, and the Llama-3.1-8B heads have the right shapes (meta device)."""

from __future__ import annotations

import copy
import inspect
from pathlib import Path

import pytest
import torch
import yaml

from spec_lightning.drafts.medusa import MedusaConfig
from spec_lightning.export.medusa import expected_shapes
from spec_lightning.modules.medusa1 import Medusa1Module
from spec_lightning.modules.medusa2 import Medusa2Module
from tests.target_configs import LLAMA_31_8B

CONFIGS = Path(__file__).parent.parent / "configs"
MEDUSA_YAMLS = {"medusa.yaml": Medusa1Module, "medusa2.yaml": Medusa2Module, "llama3.1-8b-medusa.yaml": Medusa1Module}


def model_init_args(name: str) -> dict:
    raw = yaml.safe_load((CONFIGS / name).read_text())
    cls = MEDUSA_YAMLS[name]
    assert raw["model"]["class_path"] == f"{cls.__module__}.{cls.__name__}"
    return raw


@pytest.mark.parametrize("name", MEDUSA_YAMLS)
def test_recipe_model_args_are_valid(name):
    raw = model_init_args(name)
    args = dict(raw["model"]["init_args"])
    params = inspect.signature(MEDUSA_YAMLS[name].__init__).parameters
    assert set(args) <= set(params), set(args) - set(params)
    args.pop("optimizer", None)
    args.pop("lr_scheduler", None)
    MEDUSA_YAMLS[name](**args)  # validates every hyperparameter (no target is loaded before configure_model)
    assert "tokenizer" not in raw["data"]["init_args"]  # linked from model.init_args.target by the CLI


def test_cpu_recipes_are_cpu_fp32_and_the_gpu_recipe_is_bf16_ddp():
    for name in ("medusa.yaml", "medusa2.yaml"):
        raw = model_init_args(name)
        assert raw["trainer"]["accelerator"] == "cpu" and raw["trainer"]["precision"] == "auto"
        assert raw["model"]["init_args"]["target"] == "smollm2-135m-instruct"
        assert raw["model"]["init_args"]["target_dtype"] == "auto"
        data = raw["data"]["init_args"]["data"]
        assert set(data if isinstance(data, list) else [data]) <= {"chitchat", "chitchat-smollm2", "magpie-smollm2",
                                                                      "magpie-tasks-smollm2"}
    assert model_init_args("medusa.yaml")["trainer"]["logger"]["class_path"].endswith("TensorBoardLogger")
    raw = model_init_args("llama3.1-8b-medusa.yaml")
    assert raw["trainer"]["precision"] == "bf16-mixed" and raw["trainer"]["strategy"] == "ddp"
    assert raw["model"]["init_args"]["target_dtype"] == "bfloat16"


class MetaLlama8BMedusa(Medusa1Module):
    """The 8B recipe's module with the target built on the meta device from a hand-written config."""

    def load_target(self):
        from transformers import LlamaConfig, LlamaForCausalLM

        with torch.device("meta"):
            # a deep copy: transformers writes rope_theta into the rope_scaling dict it is given, which would change
            # the shared table for the EAGLE-3 recipe tests that run after this one
            model = LlamaForCausalLM(LlamaConfig(**copy.deepcopy(LLAMA_31_8B)))
        return model.requires_grad_(False).eval()


def test_llama31_8b_heads_shapes_on_meta_device():
    args = dict(model_init_args("llama3.1-8b-medusa.yaml")["model"]["init_args"])
    args.pop("optimizer")
    args.pop("lr_scheduler")
    module = MetaLlama8BMedusa(**args)
    module.configure_model()
    k = args["num_heads"]
    assert k == 4
    state = module.heads.state_dict()
    assert all(t.device.type == "meta" for t in state.values())
    assert {n: tuple(t.shape) for n, t in state.items()} == expected_shapes(MedusaConfig(4096, 128256, 4, 1))
    assert tuple(state["blocks.3.layers.0.weight"].shape) == (4096, 4096)
    assert tuple(state["lm_heads.0.weight"].shape) == (128256, 4096)
    n_params = sum(t.numel() for t in state.values())
    assert n_params == 4 * (4096 * 4096 + 4096) + 4 * 128256 * 4096  # 2.17 B: the lm_heads dominate
    assert [n for n, p in module.named_parameters() if p.requires_grad] == [f"heads.{n}" for n in state]
    assert not any(n.startswith("target.") for n, p in module.named_parameters() if p.requires_grad)
