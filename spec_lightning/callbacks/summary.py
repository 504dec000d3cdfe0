"""The model summary printed when ``fit`` starts: Lightning's table without the columns it cannot fill here.

Lightning's summary counts FLOPs by running ``example_input_array`` through the module; a draft module has none (its
batch is a dict of token tensors, and the target needs real token ids), so Lightning printed 0 FLOPs for every layer
and "Total FLOPs: 0". Its size estimate assumes one dtype (and warns under ``bf16-mixed``), while here the target
and the draft may differ. This table drops the FLOPs and gives the size from each parameter's own dtype.
"""

from __future__ import annotations

import logging

from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import ModelSummary
from lightning.pytorch.utilities.model_summary import get_human_readable_count
from torch import nn
from torch.nn.parameter import UninitializedParameter

log = logging.getLogger(__name__)


def _numel(module: nn.Module, trainable_only: bool = False) -> int:
    return sum(p.numel() for p in module.parameters()
               if not isinstance(p, UninitializedParameter) and (p.requires_grad or not trainable_only))


def summary_table(model: nn.Module, max_depth: int = 1) -> str:
    """Name, type, parameter count and mode of ``model``'s submodules down to ``max_depth`` (-1: all), then totals."""
    named = [(n, m) for n, m in model.named_modules() if n and (max_depth < 0 or n.count(".") < max_depth)]
    rows = [("", "Name", "Type", "Params", "Mode")]
    rows += [(str(i), n, type(m).__name__, get_human_readable_count(_numel(m)), "train" if m.training else "eval")
             for i, (n, m) in enumerate(named)]
    widths = [max(len(r[c]) for r in rows) for c in range(len(rows[0]))]
    lines = [" | ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]
    lines.insert(1, "-" * len(max(lines, key=len)))
    total, trainable = _numel(model), _numel(model, trainable_only=True)
    size_mb = sum(p.numel() * p.element_size() for p in model.parameters()
                  if not isinstance(p, UninitializedParameter)) / 1e6
    modes = [m.training for m in list(model.modules())[1:]]
    totals = [(get_human_readable_count(trainable), "Trainable params"),
              (get_human_readable_count(total - trainable), "Non-trainable params"),
              (get_human_readable_count(total), "Total params"),
              (f"{size_mb:,.1f}", "Total params size (MB, each in its own dtype)"),
              (str(modes.count(True)), "Modules in train mode"),
              (str(modes.count(False)), "Modules in eval mode")]
    return "\n".join(lines + [f"{value:<10} {label}" for value, label in totals])


class DraftModelSummary(ModelSummary):
    """Lightning's ``ModelSummary`` callback (same ``max_depth``) printing :func:`summary_table`.

    ``SpecTrainer`` puts it in place of Lightning's default summary; a ``ModelSummary`` callback of your own, or
    ``enable_model_summary: false``, takes precedence.
    """

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self._max_depth and trainer.is_global_zero:
            log.info("\n%s", summary_table(pl_module, self._max_depth))
