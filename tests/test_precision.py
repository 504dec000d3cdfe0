"""precision: auto (a measured choice), and bf16-mixed training on the CPU for both modules: frozen target in bf16,
draft master weights and optimizer states in fp32."""

from __future__ import annotations

import json
import logging

import pytest
import torch
from lightning.pytorch import Trainer

import spec_lightning.precision as precision
from spec_lightning.trainer import SpecTrainer
from tests.test_eagle3_module import HandDataModule, TinyEagle3
from tests.test_medusa_module import TinyData, TinyMedusa

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize(("ratio", "expected"), [(4.3, "bf16-mixed"), (0.01, "32-true"), (1.9, "32-true")])
def test_auto_precision_follows_the_measured_bf16_speed(monkeypatch, tmp_path, ratio, expected, caplog):
    monkeypatch.setenv("SPEC_LIGHTNING_CACHE", str(tmp_path))  # no earlier record of this machine
    monkeypatch.setattr(precision, "bf16_speedup", lambda *a, **k: ratio)
    caplog.set_level(logging.INFO, logger="spec_lightning")  # a routine choice: logged at INFO
    trainer = SpecTrainer(accelerator="cpu", precision="auto", logger=False, enable_checkpointing=False,
                          enable_progress_bar=False, enable_model_summary=False)
    assert trainer.precision == expected
    [record] = [r for r in caplog.records if r.getMessage().startswith("precision auto")]
    assert record.levelno == logging.INFO
    assert f"{ratio:.2f}x as fast as fp32" in record.getMessage() and expected in record.getMessage()
    assert SpecTrainer(accelerator="cpu", precision="32-true", logger=False).precision == "32-true"


def test_the_cpu_choice_is_measured_once_and_recorded(monkeypatch, tmp_path, caplog):
    """A busy CPU's probe swings around the threshold; the first measurement is recorded, so runs agree."""
    monkeypatch.setenv("SPEC_LIGHTNING_CACHE", str(tmp_path))
    (tmp_path / "precision.json").write_text(json.dumps({"other CPU | AVX2 | torch 0": {"bf16_speedup": 0.01}}))
    calls = []
    monkeypatch.setattr(precision, "bf16_speedup", lambda *a, **k: calls.append(1) or 2.6)
    assert precision.resolve_precision("auto", "cpu") == "bf16-mixed"
    monkeypatch.setattr(precision, "bf16_speedup", lambda *a, **k: calls.append(1) or 1.9)  # a busier moment
    caplog.set_level(logging.INFO, logger="spec_lightning")
    assert precision.resolve_precision("auto", "cpu") == "bf16-mixed"
    assert len(calls) == 1  # measured once
    assert "recorded in" in caplog.records[-1].getMessage()
    records = json.loads((tmp_path / "precision.json").read_text())
    assert records["other CPU | AVX2 | torch 0"] == {"bf16_speedup": 0.01}  # other machines' records kept
    assert records[precision.cpu_key()]["bf16_speedup"] == 2.6
    (tmp_path / "precision.json").write_text("{not json")  # a damaged record: measured again and rewritten
    assert precision.resolve_precision("auto", "cpu") == "32-true" and len(calls) == 2


def test_bf16_probe_measures_both_dtypes():
    assert precision.bf16_speedup(n=64, repeats=1) > 0


@pytest.mark.parametrize("algorithm", ["eagle3", "medusa"])
def test_bf16_mixed_trains_on_cpu_with_fp32_master_weights(algorithm):
    torch.manual_seed(0)
    if algorithm == "eagle3":
        module = TinyEagle3(target_dtype="auto", draft_vocab_size=64, ttt_length=2)
        data = HandDataModule(link=module.data_link)
        trainable = lambda m: m.draft  # noqa: E731
    else:
        module, data = TinyMedusa(target_dtype="auto", num_heads=2), TinyData()
        trainable = lambda m: m.heads  # noqa: E731
    trainer = Trainer(accelerator="cpu", precision="bf16-mixed", max_steps=2, logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0)
    trainer.fit(module, datamodule=data)
    assert module.target.dtype == torch.bfloat16  # target_dtype auto follows the trainer's precision
    assert all(p.dtype == torch.float32 for p in trainable(module).parameters())
    states = [s for st in trainer.optimizers[0].state.values() for s in st.values() if torch.is_tensor(s) and s.dim()]
    assert states and all(s.dtype == torch.float32 for s in states)
    assert all(torch.isfinite(p).all() for p in trainable(module).parameters())
    assert trainer.global_step == 2


class ClipRecordingEagle3(TinyEagle3):
    """Records the total gradient norm right after Lightning's gradient clipping."""

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None) -> None:
        grads = [p.grad for p in self.trainable_parameters() if p.grad is not None]
        self.norms_before = [*getattr(self, "norms_before", []), torch.linalg.vector_norm(
            torch.stack([torch.linalg.vector_norm(g) for g in grads])).item()]
        super().configure_gradient_clipping(optimizer, gradient_clip_val, gradient_clip_algorithm)
        self.norms_after = [*getattr(self, "norms_after", []), torch.linalg.vector_norm(
            torch.stack([torch.linalg.vector_norm(g) for g in grads])).item()]


def test_bf16_mixed_clips_gradients_with_the_recipes_fused_adamw():
    # every recipe sets fused AdamW and gradient_clip_val; Lightning's MixedPrecision refuses to clip for a fused
    # optimiser (an fp16 GradScaler concern), which stopped every bf16-mixed run at its first step
    torch.manual_seed(0)
    module = ClipRecordingEagle3(target_dtype="auto", draft_vocab_size=64, ttt_length=2)  # default: fused AdamW
    trainer = SpecTrainer(accelerator="cpu", precision="bf16-mixed", max_steps=2, gradient_clip_val=1e-3,
                          logger=False, enable_checkpointing=False, enable_progress_bar=False,
                          enable_model_summary=False, limit_val_batches=0)
    trainer.fit(module, datamodule=HandDataModule(link=module.data_link))
    assert trainer.global_step == 2
    assert trainer.optimizers[0].defaults["fused"]
    assert all(before > 1e-3 for before in module.norms_before)  # clipping had something to do
    assert module.norms_after == pytest.approx([1e-3, 1e-3], rel=1e-3)
