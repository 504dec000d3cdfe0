"""Preemption: SIGTERM saves a checkpoint and exits 143 (128 + SIGTERM); resuming from it continues the same run."""

from __future__ import annotations

import signal

import pytest
import torch
from ddp_helpers import (
    EAGLE3,
    MEDUSA,
    assert_weights_equal,
    cached_run,
    callbacks_config,
    fit_args,
    kill,
    load_weights,
    read_records,
    run_cli,
    start_cli,
    wait_for,
)
from lightning.pytorch import Trainer

from cli import main
from spec_lightning.callbacks import PREEMPTED_EXIT_CODE, PreemptionCheckpoint


def test_cli_adds_the_preemption_callback_by_default(tmp_path, tiny_target_dir, tiny_chat_file):
    args = fit_args(tmp_path, tiny_target_dir, tiny_chat_file, MEDUSA, 1)[1:]  # no subcommand: run=False
    cli = main(args=args, run=False)
    assert sum(isinstance(cb, PreemptionCheckpoint) for cb in cli.trainer.callbacks) == 1


def test_a_second_instance_stays_passive():
    first, second = PreemptionCheckpoint(), PreemptionCheckpoint(exit_code=75)
    trainer = Trainer(callbacks=[first, second], logger=False, enable_progress_bar=False)
    for cb in (first, second):
        cb.setup(trainer, None, "fit")
    assert first._active and not second._active


@pytest.mark.parametrize("code", [0, 256])
def test_exit_code_must_be_non_zero(code):
    with pytest.raises(ValueError, match="exit_code"):
        PreemptionCheckpoint(exit_code=code)


def test_sigterm_saves_a_checkpoint_exits_143_and_resume_continues(tmp_path, tmp_path_factory, tiny_target_dir,
                                                                    tiny_chat_file):
    steps = 8  # 3 batches per epoch (see test_resume.py); SIGTERM arrives during step 5, mid-epoch 1
    base = tmp_path_factory.getbasetemp() / "spec_runs"  # the straight run is shared with test_resume.py
    records, weights = cached_run(base, f"Eagle3Module-{steps}-resume",
                                  fit_args(base, tiny_target_dir, tiny_chat_file, EAGLE3, steps))

    ready, log = tmp_path / "ready", tmp_path / "preempted.log"
    cfg = callbacks_config(tmp_path / "preempted.yaml", tmp_path / "preempted.jsonl", pause=(4, ready))
    proc = start_cli(fit_args(tmp_path / "p", tiny_target_dir, tiny_chat_file, EAGLE3, steps,
                              extra=("--config", str(cfg))), tmp_path, log)
    wait_for(ready, proc, log)
    assert kill(proc, signal.SIGTERM) == PREEMPTED_EXIT_CODE == 143
    ckpt = tmp_path / "p" / "checkpoints" / "last-preempted.ckpt"  # the run's checkpoint directory
    assert ckpt.is_file(), log.read_text()[-3000:]
    assert f"SIGTERM: saved {ckpt} at global step 5" in log.read_text()
    state = torch.load(ckpt, map_location="cpu", weights_only=True)
    assert state["global_step"] == 5 and "optimizer_states" in state
    assert not any(k.startswith("target.") for k in state["state_dict"])

    cfg = callbacks_config(tmp_path / "resumed.yaml", tmp_path / "resumed.jsonl", tmp_path / "resumed.pt")
    rc = run_cli(fit_args(tmp_path / "r", tiny_target_dir, tiny_chat_file, EAGLE3, steps,
                          extra=("--config", str(cfg), "--ckpt_path", str(ckpt))), tmp_path, tmp_path / "resumed.log")
    assert rc == 0, (tmp_path / "resumed.log").read_text()[-3000:]

    straight = read_records(records)
    interrupted = read_records(tmp_path / "preempted.jsonl") + read_records(tmp_path / "resumed.jsonl")
    assert [r["step"] for r in interrupted] == list(range(1, steps + 1))
    def trajectory(records):
        return [(r["rows"], r["loss"], r["lr"]) for r in records]

    assert trajectory(interrupted) == trajectory(straight)
    assert_weights_equal(load_weights(weights), load_weights(tmp_path / "resumed.pt"))
