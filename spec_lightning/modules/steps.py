"""The step bookkeeping the draft modules share: losses and per-position accuracies logged the same way.

``compute`` of EAGLE-3 (TTT steps), DFlash (block slots) and the draft LM (its one next token) returns ``loss`` and
boolean counters ``correct``/``valid`` shaped ``[P, ...]`` (one row per draft position; EAGLE-3 and DFlash also
``cum_correct``: that position and every earlier one right). The logging of those is the same for all three:
``train_loss`` plus one accuracy per position each training step (the loss guarded by
:meth:`~spec_lightning.modules.base.DraftModule.guard_loss`), ``val_loss`` and :class:`~spec_lightning.metrics.
PositionAccuracy` counters each validation step, and at the end of validation the per-position accuracies and the
chain acceptance length estimate ``1 + sum_k cum_acc_k``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from spec_lightning.metrics import PositionAccuracy
from spec_lightning.modules.base import DraftModule


def position_accuracy(correct: Tensor, valid: Tensor) -> Tensor:
    """float ``[P]``: this batch's correct / counted per position (0 where nothing counted)."""
    with torch.no_grad():
        return (correct & valid).flatten(1).sum(1).float() / valid.flatten(1).sum(1).clamp(min=1).float()


def log_train_step(module: DraftModule, out: dict[str, Tensor], batch: dict[str, Tensor], batch_idx: int,
                   accuracy_names: Sequence[str]) -> Tensor | None:
    """Log ``train_loss`` and each position's accuracy under ``accuracy_names``; return the guarded loss."""
    bs = batch["input_ids"].shape[0]
    module.log("train_loss", out["loss"].float(), prog_bar=True, batch_size=bs)
    acc = position_accuracy(out["correct"], out["valid"])
    for k, name in enumerate(accuracy_names):
        module.log(name, acc[k], batch_size=bs)
    return module.guard_loss(out["loss"], batch_idx)


def log_val_step(module: DraftModule, out: dict[str, Tensor], batch: dict[str, Tensor], val_acc: PositionAccuracy,
                 val_cum_acc: PositionAccuracy | None = None) -> None:
    """Log ``val_loss`` (synced across ranks) and count the accuracies (cumulative ones too when given)."""
    module.log("val_loss", out["loss"].float(), prog_bar=True, batch_size=batch["input_ids"].shape[0], sync_dist=True)
    val_acc.update(out["correct"], out["valid"])
    if val_cum_acc is not None:
        val_cum_acc.update(out["cum_correct"], out["valid"])


def log_chain_epoch_end(module: DraftModule, val_acc: PositionAccuracy, val_cum_acc: PositionAccuracy,
                        accuracy_names: Sequence[str], cumulative_names: Sequence[str] = ()) -> None:
    """Log each position's accuracy (and cumulative accuracy, where named) and ``val_accept_length_est``; reset."""
    acc, cum = val_acc.compute(), val_cum_acc.compute()  # every rank computes
    for k, name in enumerate(accuracy_names):
        module.log(name, acc[k].item())
        if cumulative_names:
            module.log(cumulative_names[k], cum[k].item())
    # chain acceptance length estimate: 1 (the target's own token) + expected accepted draft tokens
    module.log("val_accept_length_est", 1.0 + cum.sum().item(), prog_bar=True)
    val_acc.reset()
    val_cum_acc.reset()
