"""The one-way model -> data contract (spec_lightning.contract): the CLI hands the module's link to the datamodule,
each module states its requirements, the data side hands its splits back on the link and never reaches the module."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from cli import main
from spec_lightning.contract import DataLink, DataRequirements, TokenRows
from spec_lightning.datamodules import ChatDataModule, FeatureCacheDataModule
from spec_lightning.datamodules.feature_cache import FeatureCacheError
from spec_lightning.modules.eagle3 import Eagle3Module
from spec_lightning.modules.medusa1 import Medusa1Module

ROOT = Path(__file__).resolve().parent.parent
CPU = ["--trainer.accelerator=cpu", "--trainer.devices=1", "--trainer.strategy=auto", "--trainer.precision=32-true",
       "--trainer.logger=false"]


@pytest.mark.parametrize(("config", "aux", "heads", "trains_target"), [
    ("eagle3.yaml", "default", None, False), ("eagle3_offline.yaml", "default", None, False),
    ("medusa.yaml", "none", 3, False), ("medusa2.yaml", "none", 3, True)])
def test_cli_hands_the_models_link_to_the_datamodule(config, aux, heads, trains_target):
    cli = main(args=["--config", str(ROOT / "configs" / config), *CPU], run=False)
    assert cli.datamodule.link is cli.model.data_link  # one object: requirements out, products back
    req = cli.datamodule.link.requirements
    assert (req.target, req.aux_layers, req.num_heads, req.trains_target) == (
        cli.model.target_source, aux, heads, trains_target)
    assert "link" not in cli.datamodule.hparams  # never saved into checkpoints or the config


def test_requirements_follow_the_module_settings():
    req = Eagle3Module(target="t", aux_layer_ids=[2, 5, 9], target_dtype="auto").data_requirements()
    assert req == DataRequirements(target="t", target_dtype="auto", aux_layers=(2, 5, 9))
    assert Medusa1Module(target="t", num_heads=2).data_requirements().num_heads == 2
    with pytest.raises(ValueError, match="aux_layers must be 'none', 'default' or layer ids"):
        DataRequirements(target="t", aux_layers="some")


def test_chat_datamodule_hands_back_its_splits(tiny_target_dir, tiny_chat_file):
    link = DataLink(DataRequirements(target=str(tiny_target_dir)))
    dm = ChatDataModule(tokenizer=str(tiny_target_dir), data=str(tiny_chat_file), max_length=64, val_fraction=0.25,
                        link=link)
    assert link.training_tokens is None
    dm.setup("fit")
    assert isinstance(link.training_tokens, TokenRows) and not link.target_features
    assert [r["input_ids"] for r in link.training_tokens.read_rows()] == dm.train_dataset["input_ids"]
    assert [r["input_ids"] for r in link.validation_tokens.read_rows()] == dm.val_dataset["input_ids"]
    assert link.training_tokens.fingerprint != link.validation_tokens.fingerprint


def test_offline_datamodule_refuses_to_train_without_a_linked_model(tiny_target_dir, tmp_path):
    dm = FeatureCacheDataModule(tokenizer=str(tiny_target_dir), cache_dir=str(tmp_path))
    dm.trainer = object()  # attached to a trainer, but nobody linked the model's requirements
    with pytest.raises(FeatureCacheError, match=r"no model linked, .* build it with link=module\.data_link"):
        dm.setup("fit")


def test_no_reach_through_the_trainer_and_no_algorithm_names_in_the_data_layer():
    for path in sorted((ROOT / "spec_lightning").rglob("*.py")):
        text = path.read_text()
        # the Trainer itself and the strategy hooks own it; modules and data must not reach through it
        assert "lightning_module" not in text or path.name in ("strategies.py", "trainer.py"), path
        assert "trainer.datamodule" not in text, path
        if "datamodules" in path.parts:
            strings = {n.value for n in ast.walk(ast.parse(text)) if isinstance(n, ast.Constant)
                       and isinstance(n.value, str)}
            assert not {"medusa1", "medusa2", "eagle3"} & strings, path
