"""The command line: every YAML in configs/ parses, and fit -> export runs through LightningCLI."""

from pathlib import Path

import pytest
import torch
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
    if raw["model"]["init_args"].get("optimizer", {}).get("class_path") == "torch.optim.AdamW":
        # fused AdamW: one pass per parameter instead of foreach's temporaries (Medusa's 86 M head weights: the
        # optimiser step took ~25% of a T=512 step on this CPU; benchmarks/results/train_throughput.md)
        optimizer = cli.model.optimizer_factory([torch.nn.Parameter(torch.zeros(2))])
        assert optimizer.defaults["fused"] is True, config.name


def test_a_config_without_an_optimizer_gets_fused_adamw_and_its_printed_config_reloads(tmp_path, capsys):
    config = tmp_path / "no_optimizer.yaml"
    config.write_text("model:\n  class_path: spec_lightning.modules.medusa1.Medusa1Module\n"
                      "  init_args:\n    target: smollm2-135m-instruct\n")
    with pytest.raises(SystemExit):
        main(args=["--config", str(config), "--print_config"], run=False)
    printed = capsys.readouterr().out
    assert yaml.safe_load(printed)["model"]["init_args"]["optimizer"] == "spec_lightning.modules.base.default_optimizer"
    (tmp_path / "printed.yaml").write_text(printed)
    for source in (config, tmp_path / "printed.yaml"):
        cli = main(args=["--config", str(source), *CPU_OVERRIDES], run=False)
        optimizer = cli.model.optimizer_factory([torch.nn.Parameter(torch.zeros(2))])
        assert type(optimizer) is torch.optim.AdamW and optimizer.defaults["fused"] is True
        assert optimizer.defaults["lr"] == 1e-3 and optimizer.defaults["weight_decay"] == 0.01  # torch's defaults


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
    main(args=_fit_args(tmp_path, tiny_target_dir, tiny_chat_file, "spec_lightning.modules.medusa1.Medusa1Module",
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
        main(args=["export", "--model=spec_lightning.modules.medusa1.Medusa1Module", f"--model.target={tiny_target_dir}",
                   "--trainer.logger=false", "--ckpt_path", str(tmp_path / "none.ckpt"), "--out_dir", str(tmp_path / "o")])


class _WorseningModel:
    """A one-weight LightningModule whose validation loss rises with every validation (the last is never best)."""

    @staticmethod
    def make():
        import lightning.pytorch as pl

        class M(pl.LightningModule):
            def __init__(self):
                super().__init__()
                self.w = torch.nn.Parameter(torch.zeros(1))

            def training_step(self, batch, batch_idx):
                return (self.w - 1).pow(2).sum()

            def validation_step(self, batch, batch_idx):
                self.log("val_loss", float(self.global_step))

            def configure_optimizers(self):
                return torch.optim.SGD(self.parameters(), lr=0.1)

            def train_dataloader(self):
                return torch.utils.data.DataLoader(torch.zeros(8, 1), batch_size=1)

            def val_dataloader(self):
                return torch.utils.data.DataLoader(torch.zeros(1, 1), batch_size=1)

        return M()


@pytest.mark.parametrize("config", CONFIGS, ids=[c.name for c in CONFIGS])
def test_last_checkpoint_is_the_last_state(config, tmp_path):
    """Each recipe's ModelCheckpoint settings leave ``last.ckpt`` at the final step even when the final validation is
    the worst (with ``monitor`` + ``save_last: link`` Lightning would link it to the best, older file)."""
    import lightning.pytorch as pl

    callbacks = yaml.safe_load(config.read_text())["trainer"].get("callbacks", [])
    args = [c.get("init_args", {}) for c in callbacks if c["class_path"].endswith("ModelCheckpoint")]
    assert len(args) == 1, f"{config.name}: expected one ModelCheckpoint"
    trainer = pl.Trainer(max_steps=6, val_check_interval=2, logger=False, enable_progress_bar=False,
                         enable_model_summary=False, num_sanity_val_steps=0, accelerator="cpu",
                         callbacks=[pl.callbacks.ModelCheckpoint(dirpath=tmp_path, **args[0])])
    trainer.fit(_WorseningModel.make())
    last = torch.load(tmp_path / "last.ckpt", weights_only=True, map_location="cpu")
    assert last["global_step"] == 6
