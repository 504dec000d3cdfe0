"""The former ``MedusaModule`` (one class, ``mode: medusa1 | medusa2``): a config naming it fails with one line naming
the class to use; a checkpoint it saved exports and evaluates through ``Medusa1Module`` / ``Medusa2Module`` as
trained (the same files as the new class's own checkpoint)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from cli import main
from spec_lightning.modules.medusa import MedusaModule
from tests.test_cli import _fit_args

REPO = Path(__file__).resolve().parent.parent
OLD = "spec_lightning.modules.medusa.MedusaModule"
NEW = {"medusa1": "spec_lightning.modules.medusa1.Medusa1Module", "medusa2": "spec_lightning.modules.medusa2.Medusa2Module"}
# MedusaModule recorded every Medusa-2 setting, in Medusa-1 runs too (here at their defaults)
MEDUSA2_DEFAULTS = {"medusa2_lambda": 0.2, "head_lr_multiplier": 4.0, "base_training": "lora", "lora_r": 16,
                    "lora_alpha": 32, "lora_dropout": 0.0, "lora_target_modules": None, "self_distill": False}


def as_old_settings(settings: dict, mode: str) -> dict:
    """The settings as MedusaModule saved them: its own ``mode`` and every Medusa-2 setting."""
    return {**MEDUSA2_DEFAULTS, **settings, "mode": mode}


@pytest.fixture(scope="module", params=["medusa1", "medusa2"])
def run(request, tmp_path_factory, tiny_target_dir, tiny_chat_file):
    """A 1-step run of the new class, plus its checkpoint and config rewritten as the old MedusaModule saved them
    (Lightning stores the class path as ``hyper_parameters["_class_path"]`` beside the flat settings)."""
    mode = request.param
    root = tmp_path_factory.mktemp(mode)
    main(args=_fit_args(root, tiny_target_dir, tiny_chat_file, NEW[mode],
                        ["--model.num_heads=2", "--trainer.max_steps=1", "--trainer.limit_val_batches=0"]))
    ckpt, config = next(root.rglob("*.ckpt")), next(root.rglob("config.yaml"))
    checkpoint = torch.load(ckpt, weights_only=True)
    saved = checkpoint["hyper_parameters"]
    assert saved["_class_path"] == NEW[mode] and "mode" not in saved
    checkpoint["hyper_parameters"] = {**as_old_settings(saved, mode), "_class_path": OLD}
    old_ckpt = root / "old.ckpt"
    torch.save(checkpoint, old_ckpt)
    raw = yaml.safe_load(config.read_text())
    raw["model"] = {"class_path": OLD, "init_args": as_old_settings(raw["model"]["init_args"], mode)}
    old_config = root / "old_config.yaml"
    old_config.write_text(yaml.safe_dump(raw))
    return {"mode": mode, "ckpt": ckpt, "config": config, "old_ckpt": old_ckpt, "old_config": old_config, "root": root}


def files(directory: Path) -> dict[str, bytes]:
    """Every exported file but the export marker (it holds the time of writing)."""
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*"))
            if p.is_file() and p.name != "spec_lightning_export.json"}


def test_an_old_checkpoint_exports_what_it_trained(run):
    root = run["root"]
    main(args=["export", "--config", str(run["config"]), "--ckpt_path", str(run["ckpt"]), "--out_dir", str(root / "a")])
    main(args=["export", "--config", str(run["config"]), "--ckpt_path", str(run["old_ckpt"]),
               "--out_dir", str(root / "b")])
    exported = files(root / "a")
    assert "model.safetensors" in exported and ("base/config.json" in exported) == (run["mode"] == "medusa2")
    assert files(root / "b") == exported


def test_an_old_checkpoint_evaluates_as_trained(run, tiny_chat_file, capsys):
    results = []
    for ckpt in (run["ckpt"], run["old_ckpt"]):
        capsys.readouterr()
        main(args=["evaluate", "--config", str(run["config"]), "--ckpt_path", str(ckpt), "--prompts",
                   str(tiny_chat_file), "--num_prompts=2", "--max_new_tokens=8", "--num_draft_tokens=2", "--baseline=false",
                   "--trainer.enable_progress_bar=false"])
        results.append(json.loads(capsys.readouterr().out.strip().splitlines()[-1]))
    new, old = results
    assert old["identical_outputs"] == 2 and old["algorithm"] == run["mode"]
    assert (old["accept_length"], old["position_rates"]) == (new["accept_length"], new["position_rates"])


def test_an_old_checkpoint_loads_in_python(run):
    """``load_from_checkpoint`` of the new class: Lightning accepts the old class path (an imported subclass)."""
    from spec_lightning.modules.medusa1 import Medusa1Module
    from spec_lightning.modules.medusa2 import Medusa2Module

    cls = Medusa1Module if run["mode"] == "medusa1" else Medusa2Module
    new, old = cls.load_from_checkpoint(run["ckpt"]), cls.load_from_checkpoint(run["old_ckpt"])
    assert type(old) is cls and dict(old.hparams) == dict(new.hparams)
    state = old.state_dict()
    assert all(torch.equal(state[k], v) for k, v in new.state_dict().items())


def test_an_old_checkpoint_of_the_other_algorithm_is_refused(run, tiny_target_dir, tmp_path):
    other = NEW["medusa2" if run["mode"] == "medusa1" else "medusa1"]
    with pytest.raises(ValueError, match=rf"disagree on model class: checkpoint {NEW[run['mode']]}, config {other}"):
        main(args=["export", f"--model={other}", f"--model.target={tiny_target_dir}", "--model.num_heads=2",
                   "--trainer.logger=false", "--ckpt_path", str(run["old_ckpt"]), "--out_dir", str(tmp_path / "out")])


def test_the_old_saved_config_names_the_class_to_use(run, tmp_path):
    with pytest.raises(ValueError) as error:
        main(args=["export", "--config", str(run["old_config"]), "--ckpt_path", str(run["old_ckpt"]),
                   "--out_dir", str(tmp_path / "out")])
    message = str(error.value)
    assert "\n" not in message and f"is now {NEW[run['mode']]}" in message and "remove `mode`" in message
    assert ("medusa2_lambda" in message) == (run["mode"] == "medusa1")  # Medusa1Module takes no Medusa-2 setting
    assert not (tmp_path / "out").exists()


def test_the_command_line_refuses_an_old_config_in_one_line(tiny_target_dir, tmp_path):
    config = tmp_path / "old.yaml"
    config.write_text(f"model:\n  class_path: {OLD}\n  init_args:\n    target: {tiny_target_dir}\n    mode: medusa2\n")
    proc = subprocess.run([sys.executable, str(REPO / "cli.py"), "fit", "--config", str(config),
                           "--trainer.logger=false"], capture_output=True, text=True, cwd=tmp_path,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 2, proc.stderr[-2000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith(f"error: {OLD} with mode: medusa2 is now {NEW['medusa2']}"), proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr


@pytest.mark.parametrize(("mode", "names"), [("medusa1", [NEW["medusa1"]]), ("medusa2", [NEW["medusa2"]]),
                                             ("medusa3", list(NEW.values()))])
def test_building_the_old_class_in_python_names_the_class_to_use(mode, names):
    with pytest.raises(ValueError) as error:
        MedusaModule(mode=mode, num_heads=2)
    assert all(name in str(error.value) for name in names)
