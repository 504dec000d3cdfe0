"""What a run prints: routine lines at INFO (shown once by cli.py), Lightning's eval-mode warning only for modules
outside the frozen target, a model summary without the FLOPs it cannot compute, and no pytree deprecation warning."""

from __future__ import annotations

import logging
import warnings

import pytest
from torch import nn

import cli
from spec_lightning.trainer import SpecTrainer, eval_modules_outside_frozen_parts
from tests.test_eagle3_module import HandDataModule, TinyEagle3

pytestmark = pytest.mark.usefixtures("one_thread")


def test_eval_modules_inside_frozen_parts_are_intentional():
    model = nn.Module()
    model.frozen = nn.Sequential(nn.Linear(2, 2), nn.Dropout(0.1)).requires_grad_(False).eval()
    model.draft = nn.Sequential(nn.Linear(2, 2), nn.Dropout(0.1))
    assert eval_modules_outside_frozen_parts(model) == []
    model.draft.eval()  # a trainable part left in eval mode: its dropout (no parameters) is off too
    assert eval_modules_outside_frozen_parts(model) == ["draft", "draft.0", "draft.1"]


def _fit(module, root):
    trainer = SpecTrainer(accelerator="cpu", max_steps=1, logger=False, enable_checkpointing=False,
                          enable_progress_bar=False, limit_val_batches=0, default_root_dir=root)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        cli.configure_console()  # what `python cli.py fit` sets up
        trainer.fit(module, datamodule=HandDataModule())
    return trainer, [str(w.message) for w in caught]


def test_a_fit_prints_no_lightning_noise(caplog, tmp_path):
    caplog.set_level(logging.INFO, logger="spec_lightning")
    module = TinyEagle3(draft_vocab_size=64, ttt_length=2)
    _, caught = _fit(module, tmp_path)
    assert module.target.training is False and not any(m.training for m in module.target.modules())
    assert not [w for w in caught if "eval mode" in w]
    assert not [w for w in caught if "LeafSpec" in w]
    assert not [w for w in caught if "model summary" in w]  # Lightning's "Precision ... is not supported" line
    [summary] = [r for r in caplog.records if "Total params" in r.getMessage()]
    assert summary.levelno == logging.INFO
    text = summary.getMessage()
    assert "FLOPs" not in text and "Flops" not in text
    megabytes = sum(p.numel() * p.element_size() for p in module.parameters()) / 1e6
    assert f"{f'{megabytes:,.1f}':<10} Total params size (MB" in text
    assert [line.split("|")[-1].strip() for line in text.splitlines() if "| target " in line] == ["eval"]
    allocator = [r for r in caplog.records if r.getMessage().startswith("memory allocator")]
    assert allocator and all(r.levelno == logging.INFO for r in allocator)


def test_without_the_console_setup_lightning_raises_the_pytree_warning(tmp_path):
    """The control for the filter above: Lightning 2.6's CombinedLoader raises it on every fit."""
    trainer = SpecTrainer(accelerator="cpu", max_steps=1, logger=False, enable_checkpointing=False,
                          enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                          default_root_dir=tmp_path)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(TinyEagle3(draft_vocab_size=64, ttt_length=2), datamodule=HandDataModule())
    leaf = [w for w in caught if "LeafSpec" in str(w.message)]
    if not leaf:
        pytest.skip("this Lightning/torch pair no longer raises the pytree deprecation warning; the filter in "
                    "cli.configure_console can go")
    assert leaf[0].category is FutureWarning and leaf[0].filename.endswith("lightning/pytorch/utilities/_pytree.py")


class EvalDraftEagle3(TinyEagle3):
    def configure_model(self) -> None:
        super().configure_model()
        self.draft.eval()


def test_a_trainable_module_left_in_eval_mode_is_still_reported(tmp_path):
    _, caught = _fit(EvalDraftEagle3(draft_vocab_size=64, ttt_length=2), tmp_path)
    [warning] = [w for w in caught if "in eval mode at the start of training" in w]
    assert "outside the frozen parts" in warning and "draft" in warning


def test_a_user_model_summary_callback_is_kept():
    from lightning.pytorch.callbacks import ModelSummary

    from spec_lightning.callbacks import DraftModelSummary

    mine = ModelSummary(max_depth=2)
    trainer = SpecTrainer(accelerator="cpu", logger=False, callbacks=[mine])
    assert [c for c in trainer.callbacks if isinstance(c, ModelSummary)] == [mine]
    default = [c for c in SpecTrainer(accelerator="cpu", logger=False).callbacks if isinstance(c, ModelSummary)]
    assert len(default) == 1 and type(default[0]) is DraftModelSummary
    assert not [c for c in SpecTrainer(accelerator="cpu", logger=False, enable_model_summary=False).callbacks
                if isinstance(c, ModelSummary)]


def test_console_setup_shows_library_info_once(monkeypatch, capsys):
    logger = logging.getLogger("spec_lightning")
    monkeypatch.setattr(logging.getLogger(), "handlers", [])  # a plain `python cli.py` process: no root handlers
    monkeypatch.setattr(logger, "handlers", [])
    monkeypatch.setattr(logger, "propagate", True)
    monkeypatch.setattr(logger, "level", logging.NOTSET)
    cli.configure_console()
    cli.configure_console()  # main() runs again in the same process (tests, notebooks): still one handler
    assert len(logger.handlers) == 1
    logging.getLogger("spec_lightning.precision").info("precision auto: 32-true")
    logging.getLogger("spec_lightning.vocab").warning("a real warning")
    assert capsys.readouterr().err.splitlines() == ["precision auto: 32-true", "WARNING: a real warning"]


def test_trainer_init_is_not_confused_by_a_single_callback():
    from spec_lightning.callbacks import DraftModelSummary, PreemptionCheckpoint

    trainer = SpecTrainer(accelerator="cpu", logger=False, callbacks=PreemptionCheckpoint())
    assert sum(isinstance(c, DraftModelSummary) for c in trainer.callbacks) == 1
