"""Reliability at the command line: checkpoint/config agreement, safe checkpoint reading, non-finite losses, config
names, one-line errors with a non-zero exit."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from cli import CONFIGS_DIR, main, resolve_config_args
from spec_lightning.checkpoints import checkpoint_conflicts, read_checkpoint
from spec_lightning.errors import NonFiniteError
from tests.test_cli import _fit_args

REPO = Path(__file__).resolve().parent.parent
MEDUSA = "spec_lightning.modules.medusa1.Medusa1Module"
EAGLE3 = "spec_lightning.modules.eagle3.Eagle3Module"


@pytest.fixture(scope="module")
def medusa_run(tmp_path_factory, tiny_target_dir, tiny_chat_file):
    """A 2-step Medusa run (2 heads) on the tiny target: its checkpoint and saved config."""
    root = tmp_path_factory.mktemp("medusa_run")
    main(args=_fit_args(root, tiny_target_dir, tiny_chat_file, MEDUSA, ["--model.num_heads=2"]))
    return next(root.rglob("*.ckpt")), next(root.rglob("config.yaml"))


def test_checkpoint_of_another_algorithm_is_refused(medusa_run, tiny_target_dir, tmp_path):
    ckpt, _ = medusa_run
    with pytest.raises(ValueError, match=r"disagree on model class: checkpoint .*Medusa1Module, config .*Eagle3Module"):
        main(args=["export", f"--model={EAGLE3}", f"--model.target={tiny_target_dir}", "--trainer.logger=false",
                   "--ckpt_path", str(ckpt), "--out_dir", str(tmp_path / "out")])
    assert not (tmp_path / "out").exists()


def test_command_line_values_are_never_silently_replaced(medusa_run, tmp_path):
    ckpt, config = medusa_run
    with pytest.raises(ValueError, match=r"num_heads: checkpoint 2, config 3.*target: checkpoint '.*', config '/x/y'"):
        main(args=["export", "--config", str(config), "--model.init_args.num_heads=3", "--model.init_args.target=/x/y",
                   "--ckpt_path", str(ckpt), "--out_dir", str(tmp_path / "out")])
    # the run's own config agrees: exported as trained
    main(args=["export", "--config", str(config), "--ckpt_path", str(ckpt), "--out_dir", str(tmp_path / "ok")])
    assert (tmp_path / "ok" / "model.safetensors").is_file()


def test_conflicts_are_listed_field_by_field():
    saved = {"_class_path": MEDUSA, "num_heads": 2, "lora_target_modules": ("q_proj",), "target": "a"}
    config = {"class_path": MEDUSA, "init_args": {"num_heads": 2, "lora_target_modules": ["q_proj"], "target": "b"}}
    assert checkpoint_conflicts(saved, config) == ["target: checkpoint 'a', config 'b'"]


def test_a_file_that_is_not_a_checkpoint_gets_one_line(tmp_path):
    bogus = tmp_path / "notes.ckpt"
    bogus.write_text("hello")
    with pytest.raises(ValueError, match=r"notes\.ckpt: not a Lightning checkpoint readable with weights_only=True"):
        read_checkpoint(bogus)
    torch.save({"weights": torch.zeros(2)}, tmp_path / "plain.pt")
    with pytest.raises(ValueError, match=r"plain\.pt: not a Lightning checkpoint \(no 'state_dict'\)"):
        read_checkpoint(tmp_path / "plain.pt")


def test_pickled_code_in_a_checkpoint_is_never_run(tmp_path):
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    torch.save({"state_dict": {}, "x": Evil()}, tmp_path / "evil.ckpt")
    with pytest.raises(ValueError, match="weights_only=True"):
        read_checkpoint(tmp_path / "evil.ckpt")
    assert not marker.exists()


def test_remote_checkpoints_are_refused_before_download(tiny_target_dir, tiny_chat_file, tmp_path):
    url = "https://example.invalid/evil.ckpt"
    with pytest.raises(ValueError, match="remote checkpoints are refused"):
        main(args=[*_fit_args(tmp_path, tiny_target_dir, tiny_chat_file, MEDUSA), "--ckpt_path", url])
    with pytest.raises(ValueError, match="weights_only=False is refused"):
        main(args=[*_fit_args(tmp_path, tiny_target_dir, tiny_chat_file, MEDUSA), "--weights_only=false"])


def test_bare_config_names_resolve_to_the_repository_configs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert resolve_config_args(["fit", "--config", "medusa.yaml"]) == ["fit", "--config", str(CONFIGS_DIR / "medusa.yaml")]
    assert resolve_config_args(["--config=variants/eagle3-human-data.yaml"]) == [
        f"--config={CONFIGS_DIR / 'variants' / 'eagle3-human-data.yaml'}"]
    (tmp_path / "medusa.yaml").write_text("seed_everything: 1\n")  # a file of that name here wins
    assert resolve_config_args(["--config", "medusa.yaml"]) == ["--config", "medusa.yaml"]
    assert resolve_config_args(["--config", "missing.yaml"]) == ["--config", "missing.yaml"]


def test_design_card_command_parses_from_another_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cli = main(args=["--config", "medusa.yaml", "--trainer.logger=false"], run=False)
    assert type(cli.model).__name__ == "Medusa1Module"


class _NaNAfterFirstStep:
    """Wraps a module's loss: finite at global step 0, NaN from step 1 on."""

    def __init__(self, module, compute_name: str) -> None:
        self.module, self.inner = module, getattr(module, compute_name)

    def __call__(self, batch):
        out = self.inner(batch)
        if self.module.global_step >= 1:
            out["loss"] = out["loss"] * float("nan")
        return out


def _tiny_medusa(**kwargs):
    from tests.test_medusa_module import TinyMedusa

    return TinyMedusa(num_heads=2, **kwargs)


def test_nonfinite_loss_stops_the_run_naming_step_and_batch():
    from tests.test_medusa_module import fit

    module = _tiny_medusa()
    module.compute_losses = _NaNAfterFirstStep(module, "compute_losses")
    with pytest.raises(NonFiniteError, match=r"train_loss is nan at global step 1, epoch 0, batch index 1"):
        fit(module, steps=3)


def test_nonfinite_loss_can_skip_and_count_batches():
    from tests.test_medusa_module import fit

    module = _tiny_medusa(on_nonfinite="skip")
    module.configure_model()
    module.compute_losses = _NaNAfterFirstStep(module, "compute_losses")
    fit(module, steps=1)  # one finite step
    after_one = {k: v.clone() for k, v in module.heads.state_dict().items()}
    fit(module, steps=3)  # a new trainer: global step restarts, so batch 0 trains, then 2 NaN batches are skipped
    assert module.skipped_batches == 2
    after = module.heads.state_dict()
    assert all(torch.isfinite(v).all() for v in after.values())
    assert any(not torch.equal(after_one[k], after[k]) for k in after)  # batch 0 of the second run trained


def test_nonfinite_gradient_under_a_finite_loss_stops_the_run():
    from tests.test_medusa_module import fit

    module = _tiny_medusa()
    module.configure_model()
    module.heads.blocks[0].layers[0].weight.register_hook(lambda g: g * float("inf"))
    with pytest.raises(NonFiniteError, match=r"non-finite gradient at global step 0.*heads\.blocks\.0\.layers\.0\.weight"):
        fit(module, steps=1)


@pytest.mark.parametrize("case", ["diverging", "bad_ckpt"])
def test_cli_exits_non_zero_with_one_line(case, tiny_target_dir, tiny_chat_file, tmp_path):
    args = _fit_args(tmp_path, tiny_target_dir, tiny_chat_file, MEDUSA, ["--model.num_heads=2"])
    if case == "diverging":  # lr 1e30 overflows the weights after one step
        args += ["--model.optimizer=torch.optim.SGD", "--model.optimizer.lr=1e30", "--trainer.max_steps=4"]
        expected, code = "train_loss is", 3
    else:
        bogus = tmp_path / "x.ckpt"
        bogus.write_text("not a checkpoint")
        args += ["--ckpt_path", str(bogus)]
        expected, code = "x.ckpt: not a Lightning checkpoint", 2
    proc = subprocess.run([sys.executable, str(REPO / "cli.py"), *args], capture_output=True, text=True, cwd=tmp_path,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == code, proc.stderr[-2000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and expected in last, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr


def test_resuming_into_a_differently_configured_module_names_the_conflict(tmp_path):
    from lightning.pytorch import Trainer

    from tests.test_medusa_module import TinyData, fit

    trainer = fit(_tiny_medusa(), steps=1)
    trainer.save_checkpoint(tmp_path / "a.ckpt")
    other = _tiny_medusa(head_weights="decay")  # a setting that does not change the parameter shapes
    resume = Trainer(accelerator="cpu", max_steps=2, logger=False, enable_checkpointing=False,
                     enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0)
    with pytest.raises(ValueError, match=r"disagree on head_weights: checkpoint None, config 'decay'"):
        resume.fit(other, datamodule=TinyData(), ckpt_path=tmp_path / "a.ckpt")


def test_ckpt_path_last_is_left_to_lightning(medusa_run, tmp_path):
    ckpt, config = medusa_run
    cli = main(args=["fit", "--config", str(config), "--ckpt_path", "last", "--trainer.max_steps=3",
                     f"--trainer.default_root_dir={tmp_path}", "--trainer.logger=false"])
    assert cli.trainer.global_step >= 1  # "last" was handed to Lightning, not refused as a missing file


def test_a_conversation_the_template_refuses_is_skipped_and_counted(tmp_path):
    import json

    from spec_lightning.datamodules.chat_datamodule import tokenize_source
    from tests.chat_templates import tokenizer_for

    path = tmp_path / "chats.jsonl"
    good = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]}
    bad = {"messages": [{"role": "assistant", "content": "I speak first"}, {"role": "user", "content": "ok"},
                        {"role": "assistant", "content": "fine"}]}  # the Mistral template raises on this order
    path.write_text("\n".join(json.dumps(r) for r in (good, bad, good)) + "\n")
    columns, report = tokenize_source(tokenizer_for("mistral"), str(path), 64, "truncate", "skip")
    assert report["kept"] == 2 and report["skipped"] == {"chat template refused the conversation": 1}
    assert report["skipped_examples"][0].startswith(f"{path}:2: chat template:")


def test_custom_aux_layers_must_be_strictly_increasing():
    from spec_lightning.modules.eagle3 import Eagle3Module

    with pytest.raises(ValueError, match=r"strictly increasing without repeats .* got \[5, 2, 9\]"):
        Eagle3Module(aux_layer_ids=[5, 2, 9])
    with pytest.raises(ValueError, match="strictly increasing"):
        Eagle3Module(aux_layer_ids=[2, 2, 9])


def test_bare_overwrite_flag_writes_into_a_foreign_directory(medusa_run, tmp_path):
    """The refusal says "pass --overwrite": the bare flag works (and --overwrite false still refuses)."""
    ckpt, config = medusa_run
    out = tmp_path / "served"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    args = ["export", "--config", str(config), "--ckpt_path", str(ckpt), "--out_dir", str(out)]
    with pytest.raises(ValueError, match=r"not a spec_lightning export .*pass --overwrite"):
        main(args=[*args, "--overwrite", "false"])
    main(args=[*args, "--overwrite"])
    assert (out / "model.safetensors").is_file() and (out / "notes.txt").read_text() == "mine"


def test_an_overflowing_gradient_norm_names_the_largest_parameter():
    """Every gradient value finite (3e19), only their norm overflows: say so, and name the parameter."""
    from tests.test_medusa_module import fit

    module = _tiny_medusa()
    module.configure_model()
    module.heads.blocks[0].layers[0].weight.register_hook(lambda g: torch.full_like(g, 3e19))
    with pytest.raises(NonFiniteError, match=r"gradient norm overflow at global step 0, epoch 0: every gradient value "
                       r"is finite, but the norm of heads\.blocks\.0\.layers\.0\.weight exceeds the float range "
                       r"\(largest \|gradient\| 3e\+19 in heads\.blocks\.0\.layers\.0\.weight"):
        fit(module, steps=1)
