"""The command line: every YAML in configs/ parses, and fit -> export runs through LightningCLI."""

from pathlib import Path

import pytest
import yaml

from cli import main

CONFIGS_DIR = Path(__file__).parent.parent / "configs"
CONFIGS = sorted(CONFIGS_DIR.glob("*.yaml"))
# Recipes for GPUs are parsed and instantiated on this CPU with the device settings overridden.
CPU_OVERRIDES = ["--trainer.accelerator=cpu", "--trainer.devices=1", "--trainer.strategy=auto",
                 "--trainer.precision=32-true", "--trainer.logger=false"]


@pytest.mark.parametrize("config", CONFIGS, ids=[c.name for c in CONFIGS])
def test_every_config_parses_and_instantiates(config):
    cli = main(args=["--config", str(config), *CPU_OVERRIDES], run=False)
    raw = yaml.safe_load(config.read_text())
    assert type(cli.model).__module__ + "." + type(cli.model).__name__ == raw["model"]["class_path"]
    # the data is tokenised with the target's tokenizer (linked, not repeated)
    assert cli.datamodule.tokenizer_source == cli.model.target_source


VARIANTS = sorted((CONFIGS_DIR / "variants").glob("*.yaml"))


@pytest.mark.parametrize("variant", VARIANTS, ids=[v.name for v in VARIANTS])
def test_every_variant_overlays_its_base(variant):
    base = CONFIGS_DIR / (variant.name.split("-")[0] + ".yaml")  # variants/<base>-<what>.yaml
    cli = main(args=["--config", str(base), "--config", str(variant), *CPU_OVERRIDES[:-1]], run=False)
    overlay = yaml.safe_load(variant.read_text())
    if "data" in overlay:
        assert cli.datamodule.data == overlay["data"]["init_args"]["data"]
    assert cli.trainer.max_steps == overlay["trainer"]["max_steps"]
    assert type(cli.model).__module__ == yaml.safe_load(base.read_text())["model"]["class_path"].rsplit(".", 1)[0]


def test_print_config_shows_the_link(capsys):
    with pytest.raises(SystemExit):
        main(args=["fit", "--config", str(CONFIGS_DIR / "medusa.yaml"), "--print_config"])
    printed = yaml.safe_load(capsys.readouterr().out)
    # the tokenizer is derived from the target by the link, so it is not a separate (repeatable) setting
    assert printed["model"]["init_args"]["target"] == "smollm2-135m-instruct"
    assert "tokenizer" not in printed["data"]["init_args"]


def _fit_args(tmp_path, target_dir, data_file, model_class, extra=()):
    return [
        "fit", f"--model={model_class}", f"--model.target={target_dir}",
        "--data=spec_lightning.datamodules.ChatDataModule", f"--data.data={data_file}", "--data.max_length=64",
        "--data.batch_size=4", "--data.val_fraction=0.25", "--trainer.accelerator=cpu", "--trainer.max_steps=2",
        "--trainer.limit_val_batches=1", "--trainer.enable_progress_bar=false", f"--trainer.default_root_dir={tmp_path}",
        "--trainer.logger=lightning.pytorch.loggers.TensorBoardLogger", f"--trainer.logger.save_dir={tmp_path}",
        *extra,
    ]


def test_fit_then_export_medusa(tmp_path, tiny_target_dir, tiny_chat_file):
    main(args=_fit_args(tmp_path, tiny_target_dir, tiny_chat_file, "spec_lightning.modules.medusa.MedusaModule",
                        ["--model.num_heads=2"]))
    ckpts = list(tmp_path.rglob("*.ckpt"))
    configs = list(tmp_path.rglob("config.yaml"))
    assert len(ckpts) == 1 and len(configs) == 1
    assert list(tmp_path.rglob("events.out.tfevents.*"))  # TensorBoard got the metrics
    out = tmp_path / "export"
    main(args=["export", "--config", str(configs[0]), "--ckpt_path", str(ckpts[0]), "--out_dir", str(out)])
    assert (out / "config.json").is_file() and (out / "model.safetensors").is_file()


def test_export_refuses_missing_checkpoint(tmp_path, tiny_target_dir):
    with pytest.raises(FileNotFoundError, match="checkpoint not found"):
        main(args=["export", "--model=spec_lightning.modules.medusa.MedusaModule", f"--model.target={tiny_target_dir}",
                   "--trainer.logger=false", "--ckpt_path", str(tmp_path / "none.ckpt"), "--out_dir", str(tmp_path / "o")])
