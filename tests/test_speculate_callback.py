"""The acceptance-length callback inside ``Trainer.fit`` for both algorithms (tiny target, SmolLM2 tokenizer)."""

from __future__ import annotations

import pytest
from lightning.pytorch import Trainer
from lightning.pytorch.loggers import TensorBoardLogger

from spec_lightning.callbacks import AcceptanceLengthCallback
from spec_lightning.datamodules import ChatDataModule
from spec_lightning.modules.eagle3 import Eagle3Module
from spec_lightning.modules.medusa1 import Medusa1Module
from spec_lightning.targets import load_tokenizer

pytestmark = pytest.mark.usefixtures("one_thread")


def tensorboard_tags(log_dir) -> tuple[set[str], set[str]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(log_dir), size_guidance={"images": 0, "scalars": 0})
    acc.Reload()
    tags = acc.Tags()
    return set(tags["scalars"]), set(tags["images"])


@pytest.mark.parametrize("kind", ["medusa", "eagle3"])
def test_callback_logs_acceptance_after_validation(kind, tiny_target_dir, tiny_chat_file, tmp_path):
    target = str(tiny_target_dir)
    module = (Medusa1Module(target=target, num_heads=2) if kind == "medusa"
              else Eagle3Module(target=target, draft_vocab_size=256, ttt_length=2))
    data = ChatDataModule(tokenizer=target, data=str(tiny_chat_file), max_length=64, batch_size=4, val_fraction=0.25,
                          link=module.data_link)
    callback = AcceptanceLengthCallback(num_prompts=2, num_draft_tokens=3, max_new_tokens=6)
    logger = TensorBoardLogger(str(tmp_path), name="tb", version=0)
    trainer = Trainer(accelerator="cpu", max_steps=2, limit_train_batches=2, limit_val_batches=1, logger=logger,
                      callbacks=[callback], enable_checkpointing=False, enable_progress_bar=False,
                      enable_model_summary=False, num_sanity_val_steps=1)
    trainer.fit(module, datamodule=data)

    # the prompts are the held-out user turns, cut before the assistant's answer, with the generation prompt
    tok = load_tokenizer(target)
    assert len(callback._prompts) == 2
    for prompt in callback._prompts:
        text = tok.decode(prompt)
        assert text.rstrip().endswith("<|im_start|>assistant") and "Tell me about number" in text
        assert "comes after" not in text  # nothing of the assistant's answer
    stats = callback.last_stats
    assert stats is not None and stats.rounds >= 2
    metrics = trainer.callback_metrics
    k = 2 if kind == "medusa" else 3  # Medusa chains are capped at its 2 heads
    assert {"val_accept_length", *(f"val_accept_pos_{j}" for j in range(k))} <= set(metrics)
    assert f"val_accept_pos_{k}" not in metrics
    tau = float(metrics["val_accept_length"])
    assert tau == pytest.approx(stats.emitted / stats.rounds) and 1.0 <= tau <= k + 1
    scalars, images = tensorboard_tags(tmp_path / "tb" / "version_0")
    assert {"val_accept_length", "val_accept_pos_0"} <= scalars
    assert "val_accept_by_position" in images
