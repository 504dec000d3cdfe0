"""Eagle3Module: train an EAGLE-3 draft online against a frozen target (SPEC §3).

Per batch: one target forward under ``no_grad`` gives the aux features (outputs of ``aux_layer_ids``) and the
full-vocabulary logits; the teacher is ``softmax(target_logits[..., t2d])`` (SPEC §3.5); the draft runs
``ttt_length`` TTT steps (SPEC §3.7) and the loss is ``sum_k step_decay**k * softCE_k`` (SPEC §3.8).

Alignment (same shift as SpecForge, SPEC §3.2): at TTT step k the draft at position t consumes token ``t+k+1``,
predicts token ``t+k+2``, and its teacher is the target's distribution at position ``t+k+1``.

Which (step k, position t) pairs count (``mask_alignment``), always requiring positions t and t+k+1 to be real
(attention_mask) tokens, so the last position of a sequence never counts:

* ``"specforge"`` (default, SpecForge-compatible): iff token ``t+k`` is trainable (``loss_mask``). The first draft
  step of an assistant turn (position = last prompt token) is never trained (SpecForge issue #885).
* ``"predicted"``: iff the predicted token ``t+k+2`` is trainable, i.e. the mask is aligned with the token the
  step predicts. It trains the draft at the last prompt token (where serving starts drafting) and never on
  predictions of prompt tokens.

Pairs whose teacher argmax (full vocabulary) is outside the draft vocabulary are excluded from the loss
(SPEC §3.5) but count as misses in the accuracy metrics (SPEC §3.9).
"""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path
from typing import Literal, NamedTuple

import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor

from spec_lightning.drafts.eagle3 import Eagle3Config, Eagle3Draft
from spec_lightning.export.eagle3 import exported_embedding, load_eagle3_draft, write_eagle3
from spec_lightning.losses import fused_linear_soft_cross_entropy, same_document, step_weights
from spec_lightning.metrics import PositionAccuracy
from spec_lightning.modules.base import DraftModule, OptimizerFactory, SchedulerFactory, default_optimizer
from spec_lightning.modules.steps import log_chain_epoch_end, log_train_step, log_val_step
from spec_lightning.speculate.eagle3 import Eagle3Drafter
from spec_lightning.targets import FrozenTarget
from spec_lightning.targets.layout import rms_norm_scale
from spec_lightning.teacher import draft_vocab_teacher
from spec_lightning.vocab import DraftVocab, draft_vocab_from, identity_vocab, vocab_from_token_ids

log = logging.getLogger(__name__)

DRAFT_PREFIX = "draft."
FROZEN_DRAFT_KEYS = ("draft.embed_tokens.weight",)  # copy of the target's embedding: rebuilt, never checkpointed


class Teacher(NamedTuple):
    """The teacher of one batch (SPEC §3.5): ``valid_u [B, T-1]`` (:func:`teacher_alignment`), ``u_index [B, T-1]``
    (row of ``probs`` for teacher index u, -1 where none), ``probs [n, Vd]``, the full-vocabulary argmax
    ``target_ids [n]`` and whether it is in the draft vocabulary (``in_vocab [n]``)."""

    valid_u: Tensor
    u_index: Tensor
    probs: Tensor
    target_ids: Tensor
    in_vocab: Tensor


def teacher_alignment(input_ids: Tensor, attention_mask: Tensor, loss_mask: Tensor,
                      mask_alignment: str) -> Tensor:
    """bool ``[B, T-1]``: ``valid[u]`` for teacher index u (= t + k, teacher = target position u + 1).

    A step-k pair at draft position t counts iff ``valid[t + k]`` and token t is real (see module docstring).
    """
    attn, lm = attention_mask.bool(), loss_mask.bool()
    teacher_real = attn[:, 1:]  # target position u + 1 must be a real token
    if mask_alignment == "specforge":
        return lm[:, :-1] & teacher_real  # token u trainable
    if mask_alignment == "predicted":
        predicted = torch.zeros_like(teacher_real)
        predicted[:, :-1] = lm[:, 2:]  # token u + 2 (the prediction) trainable; beyond the sequence: no
        return predicted & teacher_real
    raise ValueError(f"mask_alignment must be 'specforge' or 'predicted', got {mask_alignment!r}")


class Eagle3Module(DraftModule):
    """EAGLE-3 draft training (online: the frozen target runs inside every step).

    Args:
        target: target source (builtin name, GGUF file, HF directory or hub id).
        target_dtype: dtype the frozen target is loaded in (``float32`` on CPU, ``bfloat16`` on GPUs).
        optimizer: optimiser over the trainable draft parameters (injected by LightningCLI).
        lr_scheduler: optional scheduler, stepped every optimiser step.
        on_nonfinite: a non-finite loss ``"error"`` (stop, non-zero exit) or ``"skip"`` (skip and count the batch).
        draft_vocab_size: Vd, the draft's output vocabulary (most frequent trainable tokens; identity if V <= Vd).
        ttt_length: number of TTT steps L trained per position.
        num_draft_layers: draft decoder layers (1 is what SGLang and vLLM serve).
        aux_layer_ids: target decoder layers whose outputs feed the draft; ``None`` = ``[1, N//2-1, N-4]``.
        step_decay: loss weight ``step_decay**k`` of TTT step k.
        loss_normalization: ``all_positions`` (mean over all B*T positions, SpecForge) or ``valid_positions``.
        mask_alignment: ``specforge`` (token t+k trainable) or ``predicted`` (predicted token t+k+2 trainable).
        attention_backend: TTT attention: ``eager`` (blockwise, memory linear in T; CPU and GPU) or ``flex``
            (``flex_attention`` compiled on GPUs, which need head_dim >= 16; uncompiled and slow on the CPU).
        init_lm_head_from_target: start ``lm_head``/``norm`` from the target's lm_head rows of the draft vocab and
            its final norm instead of SpecForge's random lm_head and unit norm (measured worse on the SmolLM2
            recipe: ``benchmarks/results/ablations.md``).
        fc_norm: EAGLE-3.1: an RMSNorm on each aux feature before ``fc`` (exported as ``fc_norm.{i}.weight``).
        norm_output: EAGLE-3.1: the next TTT step reads the post-norm hidden state (exported as ``norm_output``).
        teacher_temperature: the teacher is ``softmax(target_logits[..., t2d] / teacher_temperature)``; 1.0 is
            SpecForge's (and the default); below 1 sharpens it toward the target's argmax, which greedy decoding
            accepts. Training only: the exported draft is the same kind either way.
        feature_scaling: ``fc`` reads each aux feature dimension scaled by 1 / its RMS over the first training batch
            (``Eagle3Config.feature_scaling``); folded into ``fc.weight`` on export (plain EAGLE-3 files).
    """

    def __init__(
        self,
        target: str = "smollm2-135m-instruct",
        target_dtype: str = "float32",
        optimizer: OptimizerFactory = default_optimizer,
        lr_scheduler: SchedulerFactory | None = None,
        on_nonfinite: Literal["error", "skip"] = "error",
        draft_vocab_size: int = 32000,
        ttt_length: int = 7,
        num_draft_layers: int = 1,
        aux_layer_ids: list[int] | None = None,
        step_decay: float = 0.8,
        loss_normalization: Literal["all_positions", "valid_positions"] = "all_positions",
        mask_alignment: Literal["specforge", "predicted"] = "specforge",
        attention_backend: Literal["eager", "flex"] = "eager",
        init_lm_head_from_target: bool = False,
        fc_norm: bool = False,
        norm_output: bool = False,
        teacher_temperature: float = 1.0,
        feature_scaling: bool = False,
    ) -> None:
        super().__init__(target=target, target_dtype=target_dtype, optimizer=optimizer, lr_scheduler=lr_scheduler,
                         on_nonfinite=on_nonfinite)
        if draft_vocab_size < 1:
            raise ValueError(f"draft_vocab_size must be >= 1, got {draft_vocab_size}")
        if ttt_length < 1:
            raise ValueError(f"ttt_length must be >= 1, got {ttt_length}")
        if num_draft_layers < 1:
            raise ValueError(f"num_draft_layers must be >= 1, got {num_draft_layers}")
        step_weights(ttt_length, step_decay)  # validates step_decay in (0, 1]
        if loss_normalization not in ("all_positions", "valid_positions"):
            raise ValueError(f"loss_normalization must be 'all_positions' or 'valid_positions', "
                             f"got {loss_normalization!r}")
        if mask_alignment not in ("specforge", "predicted"):
            raise ValueError(f"mask_alignment must be 'specforge' or 'predicted', got {mask_alignment!r}")
        if aux_layer_ids is not None and list(aux_layer_ids) != sorted(set(aux_layer_ids)):
            raise ValueError(f"custom aux_layer_ids must be strictly increasing without repeats (SGLang captures each "
                             f"target layer once, in order), got {list(aux_layer_ids)}")
        if teacher_temperature <= 0:
            raise ValueError(f"teacher_temperature must be > 0, got {teacher_temperature}")
        if attention_backend not in ("eager", "flex"):
            raise ValueError(f"attention_backend must be 'eager' or 'flex', got {attention_backend!r}")
        # primitives only: callables in hparams would make checkpoints unloadable with torch.load(weights_only=True)
        self.save_hyperparameters(ignore=["optimizer", "lr_scheduler"])
        self.draft_vocab_size = draft_vocab_size
        self.ttt_length = ttt_length
        self.num_draft_layers = num_draft_layers
        self.aux_layer_ids = None if aux_layer_ids is None else [int(i) for i in aux_layer_ids]
        self.step_decay = step_decay
        self.loss_normalization = loss_normalization
        self.mask_alignment = mask_alignment
        self.attention_backend = attention_backend
        self.init_lm_head_from_target = init_lm_head_from_target
        self.teacher_temperature = float(teacher_temperature)
        self.feature_scaling = feature_scaling
        self._feature_scale_checked = False  # once per process: is fc_input_scale measured (trained or loaded)?
        self.fc_norm, self.norm_output = fc_norm, norm_output
        self.draft: Eagle3Draft | None = None
        self.draft_config: Eagle3Config | None = None
        self.val_acc = PositionAccuracy(ttt_length)
        self.val_cum_acc = PositionAccuracy(ttt_length)

    # --- construction -----------------------------------------------------------------------------------
    def build_vocab(self, target: FrozenTarget) -> DraftVocab:
        """The draft vocabulary: the ``draft_vocab_size`` most frequent trainable tokens of the training split the
        datamodule handed back on :attr:`data_link` (cached by that split's fingerprint; ``vocab.draft_vocab_from``).

        Without training data (``load_from_checkpoint``, export) a placeholder of the right shape is built; the
        real ``d2t``/``t2d`` then come from the checkpoint. Tests override this to inject a mapping.
        """
        vocab_size = int(target.text_config.vocab_size)
        if vocab_size <= self.draft_vocab_size:
            return identity_vocab(vocab_size)
        tokens = self.data_link.training_tokens
        if tokens is not None:
            return draft_vocab_from(tokens, vocab_size, self.draft_vocab_size)
        trainer = self._trainer
        if trainer is not None and getattr(trainer.state, "fn", None) == "fit":
            rank_zero_warn("Eagle3Module: no datamodule handed back its training tokens (data_link), so the draft "
                           "vocabulary is a placeholder (the first Vd token ids) unless a checkpoint provides d2t/t2d")
        return vocab_from_token_ids(torch.arange(self.draft_vocab_size), vocab_size)

    def build_draft(self, target: FrozenTarget) -> None:
        cfg = Eagle3Config.from_target_config(target.config, self.draft_vocab_size, self.num_draft_layers,
                                              self.aux_layer_ids, fc_norm=self.fc_norm, norm_output=self.norm_output,
                                              feature_scaling=self.feature_scaling)
        if self.draft_vocab_size > cfg.draft_vocab_size:  # clamped to the target's vocabulary: say so, record it
            rank_zero_warn(f"Eagle3Module: draft_vocab_size={self.draft_vocab_size} is larger than the target's "
                           f"vocabulary ({cfg.vocab_size} tokens): the draft uses the full vocabulary, Vd="
                           f"{cfg.draft_vocab_size} (identity mapping; hparams effective_draft_vocab_size, export "
                           "config.json draft_vocab_size)")
            self.hparams["effective_draft_vocab_size"] = cfg.draft_vocab_size
        with torch.device("cpu"):  # the vocab is counted/loaded on the CPU, also under Lightning's GPU init context
            vocab = self.build_vocab(target)
        if vocab.vocab_size != cfg.vocab_size or vocab.draft_vocab_size != cfg.draft_vocab_size:
            raise ValueError(f"draft vocabulary has V={vocab.vocab_size}, Vd={vocab.draft_vocab_size}; the draft "
                             f"expects V={cfg.vocab_size}, Vd={cfg.draft_vocab_size}")
        # a target on the meta device (shape checks, deferred init) gets a meta draft too
        with torch.device("meta") if target.embed_tokens.weight.is_meta else contextlib.nullcontext():
            draft = Eagle3Draft(cfg)
        draft.set_vocab(vocab.d2t, vocab.t2d)
        with torch.no_grad():
            draft.embed_tokens.weight.copy_(target.embed_tokens.weight.float())
            if self.init_lm_head_from_target:
                rows = vocab.draft_to_target_ids().to(target.lm_head.weight.device)
                draft.lm_head.weight.copy_(target.lm_head.weight.index_select(0, rows).float())
                scale = rms_norm_scale(target.final_norm)  # w (Llama), 1 + w (Gemma); None for a LayerNorm
                if scale is not None and scale.shape == draft.norm.weight.shape:
                    draft.norm.weight.copy_(scale.float())
        self.draft_config = cfg
        self.draft = draft

    def keep_in_checkpoint(self, key: str) -> bool:
        return super().keep_in_checkpoint(key) and key not in FROZEN_DRAFT_KEYS

    # --- the step ---------------------------------------------------------------------------------------
    def compute(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        """Loss, per-step losses ``[L]`` and per-step ``correct``/``valid``/``cum_correct`` ``[L, B, T]``.

        Packed batches carry ``position_ids`` and ``document_ids`` (and no ``attention_mask``): the target masks
        attention per document, the TTT attention too, and no pair reaches across a document boundary.
        """
        assert self.draft is not None and self.target is not None and self.draft_config is not None
        input_ids, loss_mask = batch["input_ids"], batch["loss_mask"]
        attention_mask, position_ids = batch.get("attention_mask"), batch.get("position_ids")
        document_ids = batch.get("document_ids")
        real = torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
        feats = self.target_features(batch, self.draft_config.aux_layer_ids)
        self.check_feature_scale(feats.aux_hidden, real)
        teacher = self.teacher(input_ids, real, loss_mask, feats.final_hidden)
        hs = self.draft.ttt_hidden(feats.aux_hidden, input_ids, attention_mask, position_ids, self.ttt_length,
                                   self.attention_backend, document_ids)
        del feats
        valid = self.counted_pairs(teacher.valid_u, real, document_ids)
        loss, step_losses, correct = self.step_losses(hs, valid, teacher)
        cum_correct = correct.int().cumprod(0).bool()  # correct at every step 0..k at the same draft position
        return {"loss": loss, "step_losses": torch.stack(step_losses).detach(), "correct": correct,
                "cum_correct": cum_correct, "valid": valid}

    def check_feature_scale(self, aux_hidden: Tensor, real: Tensor) -> None:
        """``feature_scaling``: measure the aux features' scale on the first training batch's real tokens, once (a
        resumed or loaded draft keeps its scale)."""
        if self.feature_scaling and self.training and not self._feature_scale_checked:
            if not self.draft.feature_scale_is_set():
                self.draft.set_feature_scale(aux_hidden, real)
            self._feature_scale_checked = True

    @torch.no_grad()
    def teacher(self, input_ids: Tensor, real: Tensor, loss_mask: Tensor, final_hidden: Tensor) -> Teacher:
        """Teacher rows: only the target positions some (step, position) pair can use (SPEC §3.2 shift: teacher
        index u <-> target position u + 1), computed chunk by chunk from the final hidden state (SPEC §3.5)."""
        draft, (B, T) = self.draft, input_ids.shape
        valid_u = teacher_alignment(input_ids, real, loss_mask, self.mask_alignment)  # [B, T-1]
        u_b, u_t = valid_u.nonzero(as_tuple=True)
        u_index = torch.full((B, max(T - 1, 0)), -1, dtype=torch.long, device=input_ids.device)
        u_index[u_b, u_t] = torch.arange(u_b.numel(), device=input_ids.device)
        vocab_rows = torch.arange(draft.d2t.numel(), device=input_ids.device) + draft.d2t
        probs, target_ids = draft_vocab_teacher(self.target.logits, final_hidden[u_b, u_t + 1], vocab_rows,
                                                temperature=self.teacher_temperature)
        in_vocab = draft.t2d[target_ids]  # OOV teacher argmax -> out of the loss, a miss in the metrics
        return Teacher(valid_u, u_index, probs, target_ids, in_vocab)

    @torch.no_grad()
    def counted_pairs(self, valid_u: Tensor, real: Tensor, document_ids: Tensor | None) -> Tensor:
        """bool ``[L, B, T]``: every counted (step k, draft position t) pair at once (one nonzero and one count
        transfer per batch follow)."""
        L, (B, T) = self.ttt_length, real.shape
        reach = 2 if self.mask_alignment == "predicted" else 1
        valid = torch.zeros(L, B, T, dtype=torch.bool, device=real.device)
        for k in range(min(L, T - 1)):
            n = T - 1 - k  # draft positions t < T-1-k have a teacher (u = t + k <= T - 2)
            valid[k, :, :n] = valid_u[:, k:] & real[:, :n]
            if document_ids is not None:  # never across a packed document boundary
                valid[k, :, :n] &= same_document(document_ids, k + reach, n)
        return valid

    def step_losses(self, hs: list[Tensor], valid: Tensor, teacher: Teacher) -> tuple[Tensor, list[Tensor], Tensor]:
        """``(sum_k step_decay**k * loss_k, [loss_k], correct [L, B, T])`` over the counted pairs of each step."""
        L, B, T = valid.shape
        weights = step_weights(L, self.step_decay)
        with torch.no_grad():
            _, pair_b, pair_t = valid.nonzero(as_tuple=True)  # grouped by k (row-major order)
            per_step = valid.flatten(1).sum(1).tolist()
        correct = torch.zeros_like(valid)
        step_losses = []
        loss = hs[0].new_zeros((), dtype=torch.float32)
        start = 0
        for k in range(L):
            b, t = pair_b[start:start + per_step[k]], pair_t[start:start + per_step[k]]
            start += per_step[k]
            with torch.no_grad():
                rows = teacher.u_index[b, t + k]
                counted = teacher.in_vocab[rows].float()
                norm = float(B * T) if self.loss_normalization == "all_positions" else counted.sum().clamp(min=1)
            # logits only at the pairs that can count, never a [B, T, Vd] grid (fused, chunked soft CE)
            step_loss, top = fused_linear_soft_cross_entropy(hs[k][b, t], self.draft.lm_head.weight,
                                                             teacher.probs, rows, row_weights=counted / norm)
            step_losses.append(step_loss)
            loss = loss + weights[k] * step_loss
            with torch.no_grad():
                correct[k, b, t] = self.draft.draft_to_target(top[:, 0]) == teacher.target_ids[rows]
        return loss, step_losses, correct

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor | None:
        return log_train_step(self, self.compute(batch), batch, batch_idx,
                              [f"train_acc_{k}" for k in range(self.ttt_length)])

    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        log_val_step(self, self.compute(batch), batch, self.val_acc, self.val_cum_acc)

    def on_validation_epoch_end(self) -> None:
        log_chain_epoch_end(self, self.val_acc, self.val_cum_acc, [f"val_acc_{k}" for k in range(self.ttt_length)],
                            [f"val_cum_acc_{k}" for k in range(self.ttt_length)])

    # --- decoding and export --------------------------------------------------------------------------------
    def make_drafter(self, tree_topk: int = 4, tree_depth: int = 5, tree_total_tokens: int = 24) -> Eagle3Drafter:
        self.configure_model()
        assert self.draft is not None
        return Eagle3Drafter(self.draft, tree_topk, tree_depth, tree_total_tokens)

    def export_draft(self, out_dir: str, layout: str | None = None, overwrite: bool = False) -> Path:
        """Write the SPEC §5 directory (``layout`` ``"sglang"`` or ``"vllm"``: the same files serve both)."""
        layout = layout or "sglang"
        if layout not in ("sglang", "vllm"):
            raise ValueError(f"EAGLE-3 export layout must be 'sglang' or 'vllm' (same directory), got {layout!r}")
        self.configure_model()
        assert self.draft is not None
        return write_eagle3(out_dir, self.draft.serving_state_dict(), self.draft.config, overwrite=overwrite,
                            dtype=self.export_dtype())

    def export_dtype(self) -> torch.dtype:
        """The serving dtype of the target: drafts are exported in it (SGLang casts neither side to the other)."""
        assert self.target is not None
        return self.target.dtype

    def load_export(self, directory: str) -> None:
        """Put an exported EAGLE-3 directory in place of the draft; without ``embed_tokens.weight`` in the file it
        gets the target's embedding (as vLLM/SGLang share it)."""
        self.configure_model()
        assert self.target is not None
        cfg = self.target.text_config
        draft = load_eagle3_draft(directory, target_num_hidden_layers=int(cfg.num_hidden_layers))
        c = draft.config
        if (c.hidden_size, c.vocab_size) != (int(cfg.hidden_size), int(cfg.vocab_size)):
            raise ValueError(f"{directory}: EAGLE-3 draft has hidden_size={c.hidden_size}, vocab_size={c.vocab_size}; "
                             f"the target has {cfg.hidden_size}, {cfg.vocab_size}")
        if not exported_embedding(directory):
            with torch.no_grad():
                draft.embed_tokens.weight.copy_(self.target.embed_tokens.weight.to(draft.embed_tokens.weight.dtype))
        self.draft = draft.to(self.target.device)
