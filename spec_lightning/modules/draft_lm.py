"""DraftLMModule: distil a small draft language model from the frozen target (DistillSpec-style; the third algorithm).

The draft is a few decoder layers of the target's own family (``drafts.draft_lm``), initialised from the target's
embeddings, first layers, final norm and lm_head, and trained on the target's distributions: at every position whose
next token is trainable (the last prompt token included: that is where drafting starts) the loss is the soft
cross-entropy ``-sum_v p_target(v) log q_draft(v)`` over the full vocabulary (forward KL up to the teacher's entropy,
which has no gradient), ``p_target`` being the target's real output distribution at temperature ``temperature``
from its final hidden state, computed chunk by chunk inside the fused loss. Online or offline (cached features) alike.
It is exported as a plain HF model directory and decoded by chain or dynamic tree (``speculate.draft_lm``).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor, nn

from spec_lightning.drafts.draft_lm import draft_lm_from_target
from spec_lightning.export.draft_lm import load_draft_lm, write_draft_lm
from spec_lightning.losses import fused_linear_soft_cross_entropy, shifted_labels
from spec_lightning.metrics import PositionAccuracy
from spec_lightning.modules.base import DraftModule, OptimizerFactory, SchedulerFactory, default_optimizer
from spec_lightning.modules.steps import log_train_step, log_val_step
from spec_lightning.speculate.draft_lm import DraftLMDrafter
from spec_lightning.targets import FrozenTarget, load_target_model, load_tokenizer
from spec_lightning.targets.layout import base_model, logits_transform, output_logits
from spec_lightning.teacher import distribution_fn


class DraftLMModule(DraftModule):
    """A standalone draft LM distilled from the target.

    Args:
        target: target source (builtin name, GGUF file, HF directory or hub id).
        target_dtype: dtype the frozen target is loaded in.
        optimizer: optimiser over the draft's trainable parameters (injected by LightningCLI).
        lr_scheduler: optional scheduler, stepped every optimiser step.
        on_nonfinite: a non-finite loss ``"error"`` (stop, non-zero exit) or ``"skip"`` (skip and count the batch).
        num_layers: decoder layers of the draft (copied from the target's first layers).
        freeze_embeddings: keep the input embeddings (and a tied lm_head) as copied from the target.
        temperature: temperature of the target distribution the draft learns.
    """

    def __init__(
        self,
        target: str = "smollm2-135m-instruct",
        target_dtype: str = "float32",
        optimizer: OptimizerFactory = default_optimizer,
        lr_scheduler: SchedulerFactory | None = None,
        on_nonfinite: str = "error",
        num_layers: int = 2,
        freeze_embeddings: bool = False,
        temperature: float = 1.0,
    ) -> None:
        super().__init__(target=target, target_dtype=target_dtype, optimizer=optimizer, lr_scheduler=lr_scheduler,
                         on_nonfinite=on_nonfinite)
        if num_layers < 1 or temperature <= 0:
            raise ValueError(f"num_layers must be >= 1 and temperature > 0, got {num_layers} and {temperature}")
        self.save_hyperparameters(ignore=["optimizer", "lr_scheduler"])
        self.num_layers, self.freeze_embeddings, self.temperature = num_layers, freeze_embeddings, temperature
        self.draft_lm: nn.Module | None = None
        self.val_acc = PositionAccuracy(1)

    def build_draft(self, target: FrozenTarget) -> None:
        # offline, only the target's head is loaded: its first layers are read once here to initialise the draft
        if isinstance(target, FrozenTarget):
            source = target.model
        else:
            source = load_target_model(self.target_source, self.target_dtype)
        draft = draft_lm_from_target(source, self.num_layers)
        if self.freeze_embeddings:
            draft.get_input_embeddings().requires_grad_(False)
        self.draft_lm = draft

    # --- the step ---------------------------------------------------------------------------------------------
    def compute(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        """Soft CE of the draft against the target at positions whose next token is trainable, and the top-1
        agreement with the target's argmax (``correct``/``valid`` ``[1, B, T]``)."""
        assert self.draft_lm is not None and self.target is not None
        input_ids, loss_mask, attention_mask = batch["input_ids"], batch["loss_mask"], batch.get("attention_mask")
        feats = self.target_features(batch)
        _, valid = shifted_labels(input_ids, loss_mask, attention_mask, 1, batch.get("document_ids"))  # t+1 trains
        packed = {} if batch.get("position_ids") is None else {"position_ids": batch["position_ids"]}
        hidden = base_model(self.draft_lm)(input_ids=input_ids, attention_mask=attention_mask, use_cache=False,
                                           **packed).last_hidden_state[valid]
        n = valid.sum().clamp(min=1).to(torch.float32)
        teacher_argmax = torch.zeros(hidden.shape[0], dtype=torch.long, device=hidden.device)
        teacher = distribution_fn(self.target.logits, feats.final_hidden[valid], self.temperature, teacher_argmax)
        rows = torch.ones(hidden.shape[0], device=hidden.device) / n
        if logits_transform(self.draft_lm.config, type(self.draft_lm)) is None:  # fused, chunked over the vocabulary
            loss, top = fused_linear_soft_cross_entropy(hidden, self.draft_lm.get_output_embeddings().weight,
                                                        target_fn=teacher, row_weights=rows)
        else:  # softcapped / scaled logits (Gemma, Granite, Cohere): through the family's own head path
            logits = output_logits(self.draft_lm, hidden)
            p = teacher(torch.arange(hidden.shape[0], device=hidden.device))
            loss = -(p * torch.log_softmax(logits, -1)).sum(-1).mul(rows).sum()
            top = logits.argmax(-1, keepdim=True)
        correct = torch.zeros_like(valid)
        correct[valid] = top[:, 0] == teacher_argmax
        return {"loss": loss, "correct": correct[None], "valid": valid[None]}

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor | None:
        return log_train_step(self, self.compute(batch), batch, batch_idx, ["train_acc"])

    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        log_val_step(self, self.compute(batch), batch, self.val_acc)

    def on_validation_epoch_end(self) -> None:
        self.log("val_acc", self.val_acc.compute().reshape(-1)[0].item(), prog_bar=True)  # every rank computes
        self.val_acc.reset()

    # --- decoding and export ----------------------------------------------------------------------------------
    def make_drafter(self, tree_topk: int = 4, tree_depth: int = 5, tree_total_tokens: int = 24) -> DraftLMDrafter:
        self.configure_model()
        return DraftLMDrafter(self.draft_lm, tree_topk, tree_depth, tree_total_tokens)

    def export_draft(self, out_dir: str, layout: str | None = None, overwrite: bool = False) -> Path:
        """A plain HF model directory with the target's tokenizer (``layout`` ``"hf"``, the only one)."""
        if layout not in (None, "hf"):
            raise ValueError(f"a draft LM exports as a plain HF directory (layout 'hf'), got {layout!r}")
        self.configure_model()
        return write_draft_lm(out_dir, self.draft_lm, load_tokenizer(self.target_source), overwrite=overwrite)

    def load_export(self, directory: str) -> None:
        self.configure_model()
        assert self.target is not None
        self.draft_lm = load_draft_lm(directory, dtype=torch.float32).to(self.target.device)
