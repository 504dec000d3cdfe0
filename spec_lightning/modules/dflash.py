"""DFlashModule: train a DFlash block draft against a frozen target (arXiv 2602.06036; the fourth algorithm).

Per batch (conventions and their sources: ``docs/dflash.md``): one target forward under ``no_grad`` gives the
features of ``target_layer_ids`` and the final hidden states; each row gets up to ``num_anchors`` anchor positions
drawn among its trainable tokens (``drafts.dflash.sample_anchors``); each anchor a opens a block
``[token a, mask x (block_size - 1)]`` at positions ``a .. a + block_size - 1`` that sees the context strictly before
a and its own block (non-causal), never another block. Slot k >= 1 of a block predicts token ``a + k`` and counts
iff that token is trainable, with weight ``exp(-(k - 1) / loss_decay_gamma)`` (paper Eq. 4). The loss is the
weighted mean over all counted slots of the batch of the cross-entropy of the draft's logits (``norm`` then the
target's lm_head) against

* ``teacher="target"`` (default): the target's own distribution at position ``a + k - 1`` (its prediction of token
  ``a + k``, full vocabulary, computed chunk by chunk inside the fused loss), as the draft LM distils; or
* ``teacher="data"``: the data's token ``a + k`` (hard labels: SpecForge's and the paper's loss).

Accuracy per slot compares the draft's argmax with the target's argmax (``teacher="target"``) or the data's token;
the cumulative version (slots 1..k all right) estimates the chain acceptance length.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Literal

import torch
from torch import Tensor

from spec_lightning.drafts.dflash import (
    DFlashConfig,
    DFlashDraft,
    block_attention_mask,
    block_input_ids,
    block_positions,
    decay_weights,
    sample_anchors,
)
from spec_lightning.export.dflash import load_dflash_draft, write_dflash
from spec_lightning.losses import fused_linear_cross_entropy, fused_linear_soft_cross_entropy
from spec_lightning.metrics import PositionAccuracy
from spec_lightning.modules.base import DraftModule, OptimizerFactory, SchedulerFactory, default_optimizer
from spec_lightning.modules.steps import log_chain_epoch_end, log_train_step, log_val_step
from spec_lightning.speculate.dflash import DFlashDrafter
from spec_lightning.targets import FrozenTarget
from spec_lightning.teacher import distribution_fn


class DFlashModule(DraftModule):
    """DFlash block-draft training, online (the feature cache does not know ``target_layer_ids`` yet:
    ``docs/adding_an_algorithm.md`` section 4).

    Args:
        target: target source (builtin name, GGUF file, HF directory or hub id).
        target_dtype: dtype the frozen target is loaded in (``auto``: the trainer's precision decides).
        optimizer: optimiser over the draft's trainable parameters (injected by LightningCLI).
        lr_scheduler: optional scheduler, stepped every optimiser step.
        on_nonfinite: a non-finite loss ``"error"`` (stop, non-zero exit) or ``"skip"`` (skip and count the batch).
        block_size: B, the anchor plus B - 1 masked slots; decoding proposes at most B - 1 tokens per round.
        num_draft_layers: Qwen3 decoder layers of the draft.
        target_layer_ids: target decoder layers whose outputs feed ``fc``; ``None`` = z-lab's default (one per draft
            layer, spread over layers 1 .. N - 3; ``drafts.dflash.default_target_layer_ids``).
        num_anchors: blocks drawn per row and batch (SpecForge's default is 512 on 2k-8k-token rows).
        loss_decay_gamma: slot k >= 1 weighs ``exp(-(k - 1) / gamma)``; SpecForge suggests 7 / 5 / 4 for block sizes
            16 / 10 / 8 (paper Eq. 4); ``None`` weighs every slot alike.
        teacher: ``"target"`` (the target's distribution, soft) or ``"data"`` (the data's tokens, hard).
        mask_token_id: the id the mask slots carry (``dflash_config.mask_token_id``); ``None`` = the last id of the
            target's vocabulary. The draft trains its own ``mask_embedding`` for it (exported as
            ``mask_embedding.pt``), so the id need not be a real mask token.
    """

    def __init__(
        self,
        target: str = "smollm2-135m-instruct",
        target_dtype: str = "float32",
        optimizer: OptimizerFactory = default_optimizer,
        lr_scheduler: SchedulerFactory | None = None,
        on_nonfinite: Literal["error", "skip"] = "error",
        block_size: int = 8,
        num_draft_layers: int = 2,
        target_layer_ids: list[int] | None = None,
        num_anchors: int = 32,
        loss_decay_gamma: float | None = 4.0,
        teacher: Literal["target", "data"] = "target",
        mask_token_id: int | None = None,
    ) -> None:
        super().__init__(target=target, target_dtype=target_dtype, optimizer=optimizer, lr_scheduler=lr_scheduler,
                         on_nonfinite=on_nonfinite)
        if block_size < 2 or num_draft_layers < 1 or num_anchors < 1:
            raise ValueError(f"block_size must be >= 2, num_draft_layers and num_anchors >= 1; got {block_size}, "
                             f"{num_draft_layers}, {num_anchors}")
        if loss_decay_gamma is not None and loss_decay_gamma <= 0:
            raise ValueError(f"loss_decay_gamma must be > 0 or null, got {loss_decay_gamma}")
        if teacher not in ("target", "data"):
            raise ValueError(f"teacher must be 'target' or 'data', got {teacher!r}")
        self.save_hyperparameters(ignore=["optimizer", "lr_scheduler"])
        self.block_size, self.num_draft_layers, self.num_anchors = block_size, num_draft_layers, num_anchors
        self.target_layer_ids = None if target_layer_ids is None else [int(i) for i in target_layer_ids]
        self.loss_decay_gamma, self.teacher, self.mask_token_id = loss_decay_gamma, teacher, mask_token_id
        self.draft: DFlashDraft | None = None
        self.val_acc = PositionAccuracy(block_size - 1)
        self.val_cum_acc = PositionAccuracy(block_size - 1)

    def build_draft(self, target: FrozenTarget) -> None:
        cfg = DFlashConfig.from_target_config(target.config, self.num_draft_layers, self.block_size,
                                              self.mask_token_id, self.target_layer_ids)
        with torch.device("meta") if target.embed_tokens.weight.is_meta else contextlib.nullcontext():
            draft = DFlashDraft(cfg)
        if not target.embed_tokens.weight.is_meta:
            with torch.no_grad():  # an untrained mask slot reads what the target's embedding holds for its id
                draft.mask_embedding.copy_(target.embed_tokens.weight[cfg.mask_token_id].float())
        self.draft = draft

    # --- the step ---------------------------------------------------------------------------------------------
    def compute(self, batch: dict[str, Tensor], generator: torch.Generator | None = None) -> dict[str, Tensor]:
        """Loss, ``correct``/``cum_correct``/``valid`` ``[B - 1, rows, blocks]`` per slot 1..B-1, and the sampled
        ``anchors``/``keep`` ``[rows, blocks]``."""
        assert self.draft is not None and self.target is not None
        draft, bs = self.draft, self.block_size
        input_ids, loss_mask = batch["input_ids"], batch["loss_mask"]
        attention_mask, position_ids = batch.get("attention_mask"), batch.get("position_ids")
        real = torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
        B, T = input_ids.shape
        feats = self.target_features(batch, draft.config.target_layer_ids)
        anchors, keep = sample_anchors(loss_mask.bool() & real, bs, self.num_anchors, generator)
        n = anchors.shape[1]
        positions = torch.arange(T, device=input_ids.device).expand(B, T) if position_ids is None else position_ids
        context = draft.context_kv(draft.project(feats.aux_hidden), positions)
        mask = block_attention_mask(anchors, keep, bs, real)
        if batch.get("document_ids") is not None:  # packed rows: a block sees its own document only
            docs = batch["document_ids"]
            anchor_doc = docs.gather(1, anchors).repeat_interleave(bs, dim=1)  # [B, Q]
            mask[:, 0, :, :T] &= docs[:, None, :] == anchor_doc[..., None]
        block_emb = draft.embed(block_input_ids(input_ids, anchors, bs, draft.config.mask_token_id),
                                self.target.embed_tokens)
        hidden = draft.block_hidden(block_emb, block_positions(positions.gather(1, anchors), bs), context, mask)
        return self._block_loss(batch, feats.final_hidden, hidden.view(B, n, bs, hidden.shape[-1]), anchors, keep)

    def _slot_weights(self, batch: dict[str, Tensor], anchors: Tensor, keep: Tensor) -> Tensor:
        """float ``[B, n, bs]``: each block slot's loss weight (0 for the anchor slot, unused blocks, untrainable
        tokens and, in packed rows, tokens of another document)."""
        bs = self.block_size
        label_pos = anchors[..., None] + torch.arange(bs, device=anchors.device)  # [B, n, bs], < T by sampling
        B, n = anchors.shape
        trainable = batch["loss_mask"].bool().gather(1, label_pos.view(B, -1)).view(B, n, bs)
        if batch.get("attention_mask") is not None:
            trainable &= batch["attention_mask"].bool().gather(1, label_pos.view(B, -1)).view(B, n, bs)
        if batch.get("document_ids") is not None:
            docs = batch["document_ids"]
            trainable &= docs.gather(1, label_pos.view(B, -1)).view(B, n, bs) == docs.gather(1, anchors)[..., None]
        w = decay_weights(bs, self.loss_decay_gamma, anchors.device)
        return trainable.float() * keep[..., None].float() * w

    def _block_loss(self, batch: dict[str, Tensor], final_hidden: Tensor, hidden: Tensor, anchors: Tensor,
                    keep: Tensor) -> dict[str, Tensor]:
        """The weighted-mean CE of the counted slots (module docstring) and the per-slot accuracy counters."""
        assert self.target is not None
        bs = self.block_size
        weights = self._slot_weights(batch, anchors, keep)  # [B, n, bs]
        b, i, k = (weights > 0).nonzero(as_tuple=True)
        label_pos = anchors[b, i] + k
        row_weights = weights[b, i, k] / weights.sum().clamp(min=1e-6)
        head = self.target.lm_head.weight
        rows = hidden[b, i, k]
        if rows.shape[0] == 0:  # nothing trainable in the batch: a zero loss that still reaches the draft
            loss, top, expected = hidden.sum() * 0.0, rows.new_zeros(0, 1, dtype=torch.long), label_pos
        elif self.teacher == "target":
            expected = torch.zeros(rows.shape[0], dtype=torch.long, device=rows.device)  # teacher argmax, filled
            teacher = distribution_fn(self.target.logits, final_hidden[b, label_pos - 1], 1.0, expected)
            loss, top = fused_linear_soft_cross_entropy(rows, head, target_fn=teacher, row_weights=row_weights)
        else:
            expected = batch["input_ids"][b, label_pos]
            loss, top = fused_linear_cross_entropy(rows, head, expected, row_weights=row_weights)
        B, n = anchors.shape
        valid = torch.zeros(bs - 1, B, n, dtype=torch.bool, device=rows.device)
        correct = torch.zeros_like(valid)
        valid[k - 1, b, i] = True
        correct[k - 1, b, i] = top[:, 0] == expected
        # slots 1..k all right; an uncounted slot (untrainable token) breaks the run like a miss
        cum_correct = (correct & valid).int().cumprod(0).bool()
        return {"loss": loss, "correct": correct, "cum_correct": cum_correct, "valid": valid, "anchors": anchors,
                "keep": keep}

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor | None:
        return log_train_step(self, self.compute(batch), batch, batch_idx,
                              [f"train_acc_{k}" for k in range(1, self.block_size)])

    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        # the same anchors every validation (a fixed generator per batch), so val_loss is comparable across runs
        generator = torch.Generator(device=batch["input_ids"].device).manual_seed(batch_idx)
        log_val_step(self, self.compute(batch, generator), batch, self.val_acc, self.val_cum_acc)

    def on_validation_epoch_end(self) -> None:
        log_chain_epoch_end(self, self.val_acc, self.val_cum_acc, [f"val_acc_{k}" for k in range(1, self.block_size)])

    # --- decoding and export ----------------------------------------------------------------------------------
    def make_drafter(self, tree_topk: int = 4, tree_depth: int = 5, tree_total_tokens: int = 24) -> DFlashDrafter:
        """Chains of up to ``block_size - 1`` tokens from one draft forward; trees from each slot's top-k
        (``speculate.dflash``)."""
        self.configure_model()
        assert self.draft is not None and self.target is not None
        return DFlashDrafter(self.draft, self.target.embed_tokens, self.target.lm_head, tree_topk, tree_depth,
                             tree_total_tokens)

    def export_draft(self, out_dir: str, layout: str | None = None, overwrite: bool = False) -> Path:
        """vLLM's ``DFlashDraftModel`` directory (``layout`` ``"vllm"``; SGLang reads the same files)."""
        if layout not in (None, "vllm", "sglang"):
            raise ValueError(f"a DFlash draft exports in vLLM's DFlashDraftModel layout ('vllm'), got {layout!r}")
        self.configure_model()
        assert self.draft is not None and self.target is not None
        return write_dflash(out_dir, self.draft, overwrite=overwrite, dtype=self.target.dtype)

    def load_export(self, directory: str) -> None:
        self.configure_model()
        assert self.target is not None
        draft = load_dflash_draft(directory)
        c, t = draft.config, self.target.text_config
        if (c.hidden_size, c.vocab_size, c.target_num_hidden_layers) != (int(t.hidden_size), int(t.vocab_size),
                                                                         int(t.num_hidden_layers)):
            raise ValueError(f"{directory}: DFlash draft has hidden_size={c.hidden_size}, vocab_size={c.vocab_size}, "
                             f"{c.target_num_hidden_layers} target layers; the target has {t.hidden_size}, "
                             f"{t.vocab_size}, {t.num_hidden_layers}")
        self.draft = draft.to(self.target.device)
