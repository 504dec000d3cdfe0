"""No silent trap: self-distilled data written by one target is refused for a draft of another target (one line
saying how to regenerate), unless ``allow_other_target`` says it is meant."""

from __future__ import annotations

import json

import pytest

from spec_lightning.datagen import builtins
from spec_lightning.datamodules import ChatDataModule
from spec_lightning.datamodules.catalog import same_target


def _answers_of_another_target(tmp_path):
    """Eight conversations whose answers Llama-3.1-8B-Instruct wrote (as its ``regenerate`` output says)."""
    path = tmp_path / "answers.jsonl"
    rows = [{"id": f"r{i}", "messages": [{"role": "user", "content": f"question {i}?"},
                                         {"role": "assistant", "content": f"answer number {i}."}],
             "provenance": {"target": "meta-llama/Llama-3.1-8B-Instruct", "source_id": f"r{i}"}} for i in range(8)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_builtin_set_of_another_target_is_refused_before_anything_is_built(tiny_target_dir, monkeypatch):
    def build(*args, **kwargs):
        raise AssertionError("the builtin set must not be built for a refused target")

    monkeypatch.setattr(builtins, "regenerate", build)
    dm = ChatDataModule(tokenizer=str(tiny_target_dir), data="chitchat-smollm2")
    with pytest.raises(ValueError) as e:
        dm.prepare_data()
    message = str(e.value)
    assert "\n" not in message and "'chitchat-smollm2'" in message and "'smollm2-135m-instruct'" in message
    assert f"python cli.py regenerate --target {tiny_target_dir}" in message
    assert "--data.init_args.allow_other_target true" in message
    with pytest.raises(ValueError, match="allow_other_target"):  # in a mix too, and on every rank's setup
        ChatDataModule(tokenizer=str(tiny_target_dir), data=["chitchat", "magpie-smollm2"]).setup("fit")


def test_users_regenerated_file_of_another_target_is_refused_and_the_override_trains(tiny_target_dir, tmp_path):
    path = _answers_of_another_target(tmp_path)
    with pytest.raises(ValueError, match=r"holds the answers of target 'meta-llama/Llama-3\.1-8B-Instruct'"):
        ChatDataModule(tokenizer=str(tiny_target_dir), data=str(path), val_fraction=0.25).prepare_data()
    dm = ChatDataModule(tokenizer=str(tiny_target_dir), data=str(path), val_fraction=0.25, allow_other_target=True)
    dm.prepare_data()
    dm.setup("fit")
    assert len(dm.train_dataset) + len(dm.val_dataset) == 8
    # the same target by another name passes; human data (no provenance) passes
    same = tmp_path / "same.jsonl"
    same.write_text(path.read_text().replace("meta-llama/Llama-3.1-8B-Instruct", str(tiny_target_dir)))
    ChatDataModule(tokenizer=str(tiny_target_dir), data=str(same), val_fraction=0.25).prepare_data()


def test_same_target_by_another_name():
    assert same_target("HuggingFaceTB/SmolLM2-135M-Instruct", "smollm2-135m-instruct")
    assert same_target("/models/Llama-3.1-8B/", "meta-llama/Llama-3.1-8B")
    assert not same_target("meta-llama/Llama-3.1-8B", "meta-llama/Llama-3.1-8B-Instruct")


def test_the_cache_command_passes_allow_other_target_through(tiny_target_dir, tmp_path):
    """``cache`` tokenises with a ChatDataModule of its own: the override reaches it from the flag or the YAML."""
    import yaml

    from spec_lightning.cache_cli import main as cache_main

    path = _answers_of_another_target(tmp_path)
    args = ["--config", "eagle3_offline.yaml", "--target", str(tiny_target_dir), "--data", str(path),
            "--val_fraction", "0.25", "--cache_dir", str(tmp_path / "cache"), "--dry_run"]
    with pytest.raises(ValueError, match="allow_other_target"):
        cache_main(args)
    assert cache_main([*args, "--allow_other_target"])["tokens"] > 0
    config = tmp_path / "other.yaml"
    config.write_text(yaml.safe_dump({"data": {"init_args": {"allow_other_target": True}}}))
    assert cache_main([*args, "--config", str(config)])["tokens"] > 0
