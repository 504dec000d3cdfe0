"""Medusa1Module: train Medusa heads on a frozen target (Medusa-1, SPEC §4).

loss = Σ_h w_h · CE_h with ``head_weights`` "uniform" (w_h = 1, default), "decay" (0.8^h) or a list; the target is
frozen (``self.target``, never optimised, never saved) and its final hidden state is read online or from an offline
feature cache. Heads, labels, losses and export: :mod:`spec_lightning.modules.medusa_heads`.
"""

from __future__ import annotations

from torch import Tensor

from spec_lightning.modules.medusa_heads import MedusaHeadsModule
from spec_lightning.targets import FrozenTarget


class Medusa1Module(MedusaHeadsModule):
    """Medusa-1: K heads trained on the frozen target's final hidden state (online, or cached offline).

    Args:
        target: target source (builtin name, GGUF file, HF directory or hub id).
        target_dtype: dtype the target is loaded in.
        optimizer: optimiser factory over the heads (LightningCLI injects it).
        lr_scheduler: optional scheduler factory, stepped every optimiser step.
        on_nonfinite: a non-finite loss ``"error"`` (stop, non-zero exit) or ``"skip"`` (skip and count the batch).
        num_heads: K Medusa heads (head h predicts token t+2+h).
        num_layers: residual blocks per head.
        head_weights: "uniform" (default), "decay" (0.8^h) or K floats.
    """

    default_head_weights = "uniform"

    def base_forward(self, input_ids: Tensor, attention_mask: Tensor | None,
                     batch: dict[str, Tensor] | None = None) -> Tensor:
        """The frozen target's final post-norm hidden state ``[B, T, H]`` (no grad; cached in the batch offline)."""
        batch = batch if batch is not None else {"input_ids": input_ids, "attention_mask": attention_mask}
        return self.target_features(batch).final_hidden

    def total_loss(self, batch: dict[str, Tensor], hidden: Tensor, heads_total: Tensor,
                   out: dict[str, Tensor]) -> Tensor:
        return heads_total

    def param_groups(self) -> list:
        return self.head_parameters()

    def trained_target(self) -> FrozenTarget:
        assert self.target is not None
        return self.target
