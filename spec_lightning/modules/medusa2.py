"""Medusa2Module: train Medusa heads and the base model jointly (Medusa-2, SPEC §4.4).

The base model is trained too and lives in ``self.base`` (LoRA adapters via peft, or full fine-tuning).
loss = base_loss + ``medusa2_lambda`` · Σ_h w_h · CE_h (w_h default "decay"), where base_loss is the next-token CE on
trainable tokens, or with ``self_distill`` the KL divergence KL(p_original || p_base) of the base head to the frozen
original model (the Medusa paper's self-distillation, for data the target did not generate). The heads' learning rate
is ``head_lr_multiplier`` × the injected optimiser's lr (the base groups use that lr as is). With LoRA the original
model is the same network with adapters disabled; with full fine-tuning a frozen copy is kept in ``self.target``
(never saved). Checkpoints hold the heads plus the LoRA adapters (or the full base); exports write the trained base
(LoRA merged) beside the heads. Heads, labels, head losses: :mod:`spec_lightning.modules.medusa_heads`.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from pathlib import Path
from typing import Literal

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from spec_lightning.losses import fused_linear_cross_entropy, fused_linear_soft_cross_entropy, shifted_labels
from spec_lightning.modules.base import TARGET_PREFIX, OptimizerFactory, SchedulerFactory, default_optimizer
from spec_lightning.modules.medusa_heads import BASE_EXPORT_DIR, MedusaHeadsModule
from spec_lightning.targets import FrozenTarget
from spec_lightning.targets.layout import attention_projection_targets, base_model, logits_transform, output_logits

BASE_PREFIX = "base."


class Medusa2Module(MedusaHeadsModule):
    """Medusa-2: K heads and the base model (LoRA or full fine-tuning) trained jointly.

    Args:
        target: target source (builtin name, GGUF file, HF directory or hub id): the base model trained here.
        target_dtype: dtype the target is loaded in.
        optimizer: optimiser factory (LightningCLI injects it); its lr is the base lr.
        lr_scheduler: optional scheduler factory, stepped every optimiser step.
        on_nonfinite: a non-finite loss ``"error"`` (stop, non-zero exit) or ``"skip"`` (skip and count the batch).
        num_heads: K Medusa heads (head h predicts token t+2+h).
        num_layers: residual blocks per head.
        head_weights: "uniform", "decay" (0.8^h, default) or K floats.
        medusa2_lambda: weight λ of the heads' loss against the base loss (weight 1).
        head_lr_multiplier: heads' lr = this × the optimiser's lr.
        base_training: base training: "lora" (peft adapters) or "full" fine-tuning.
        lora_r: LoRA rank.
        lora_alpha: LoRA alpha (scaling alpha / r).
        lora_dropout: LoRA dropout.
        lora_target_modules: module names LoRA adapts (default: every decoder block's attention projections, found
            per family).
        self_distill: base loss = KL(original || base) on the base head instead of next-token CE.
    """

    default_head_weights = "decay"
    trains_target = True  # the base's features change every step: no offline feature cache

    def __init__(
        self,
        target: str = "smollm2-135m-instruct",
        target_dtype: str = "float32",
        optimizer: OptimizerFactory = default_optimizer,
        lr_scheduler: SchedulerFactory | None = None,
        on_nonfinite: Literal["error", "skip"] = "error",
        num_heads: int = 4,
        num_layers: int = 1,
        head_weights: str | list[float] | None = None,
        medusa2_lambda: float = 0.2,
        head_lr_multiplier: float = 4.0,
        base_training: Literal["lora", "full"] = "lora",
        lora_r: int = 16,
        lora_alpha: int = 32,
        lora_dropout: float = 0.0,
        lora_target_modules: list[str] | None = None,
        self_distill: bool = False,
    ) -> None:
        super().__init__(target=target, target_dtype=target_dtype, optimizer=optimizer, lr_scheduler=lr_scheduler,
                         on_nonfinite=on_nonfinite, num_heads=num_heads, num_layers=num_layers,
                         head_weights=head_weights)
        if base_training not in ("lora", "full"):
            raise ValueError(f"base_training must be 'lora' or 'full', got {base_training!r}")
        if medusa2_lambda < 0 or head_lr_multiplier <= 0:
            raise ValueError(
                f"medusa2_lambda must be >= 0 and head_lr_multiplier > 0, got {medusa2_lambda} and {head_lr_multiplier}"
            )
        if lora_r < 1:
            raise ValueError(f"lora_r must be >= 1, got {lora_r}")
        self.medusa2_lambda = medusa2_lambda
        self.head_lr_multiplier = head_lr_multiplier
        self.base_training = base_training
        self.lora_target_modules = list(lora_target_modules or ["q_proj", "k_proj", "v_proj", "o_proj"])
        self.self_distill = self_distill
        self.base: nn.Module | None = None  # the trainable base (peft-wrapped for LoRA)

    # --- model construction -------------------------------------------------------------------------
    def configure_model(self) -> None:
        """Idempotent: a trainable base (+ a frozen copy for full fine-tuning with self-distillation) and the heads."""
        if self.base is not None:
            return
        model = self.load_target()
        if self.base_training == "full":
            if self.self_distill:  # the frozen original for the KL term; under target.* so never saved
                self.target = FrozenTarget(copy.deepcopy(model))
            model.requires_grad_(True)
            self.base = model
        else:
            from peft import LoraConfig, get_peft_model

            model.requires_grad_(False)
            # the user's module names, else every decoder block's attention projections under this family's names
            # (q/k/v/o_proj, Phi-3 qkv_proj, GPT-NeoX query_key_value/dense, GPT-2 c_attn/c_proj), never a vision
            # tower's or an MLP's
            explicit = self.hparams.get("lora_target_modules") is not None
            targets = self.lora_target_modules if explicit else attention_projection_targets(model)
            lora = LoraConfig(
                r=self.hparams.lora_r, lora_alpha=self.hparams.lora_alpha, lora_dropout=self.hparams.lora_dropout,
                target_modules=targets, bias="none",
            )
            self.base = get_peft_model(model, lora)
        self._build_heads(self._base_lm().get_output_embeddings().weight, self._base_lm().config)

    def _base_lm(self) -> nn.Module:
        """The HF causal LM trained here (under the peft wrapper for LoRA)."""
        assert self.base is not None
        return self.base.get_base_model() if self.base_training == "lora" else self.base

    # --- checkpoints and optimisation ---------------------------------------------------------------
    def keep_in_checkpoint(self, key: str) -> bool:
        if key.startswith(TARGET_PREFIX):
            return False  # the frozen original copy (full fine-tuning + self_distill)
        if key.startswith(BASE_PREFIX) and self.base_training == "lora":
            return "lora_" in key  # adapters only; the frozen base weights are reloaded from the source
        return True

    def param_groups(self) -> list[dict]:
        head_params = self.head_parameters()
        base_params = [p for p in self.base.parameters() if p.requires_grad]
        return [
            {"params": base_params, "name": "base"},
            {"params": head_params, "name": "heads", "lr_scale": self.head_lr_multiplier},
        ]

    # --- forward and loss ---------------------------------------------------------------------------
    def base_forward(self, input_ids: Tensor, attention_mask: Tensor | None,
                     batch: dict[str, Tensor] | None = None) -> Tensor:
        """The trainable base's final post-norm hidden state ``[B, T, H]``."""
        base = base_model(self._base_lm())
        packed = {} if batch is None or batch.get("position_ids") is None else {"position_ids": batch["position_ids"]}
        return base(input_ids=input_ids, attention_mask=attention_mask, use_cache=False, **packed).last_hidden_state

    @torch.no_grad()
    def original_logits(self, input_ids: Tensor, attention_mask: Tensor | None, valid: Tensor) -> Tensor:
        """Real logits ``[N, V]`` of the original (untrained) model at the ``valid`` positions, for self-distillation."""
        if self.target is not None:
            hidden = self.target(input_ids, attention_mask).final_hidden
            return self.target.logits(hidden[valid])
        lm = self._base_lm()
        with self.base.disable_adapter():
            hidden = base_model(lm)(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
            return output_logits(lm, hidden.last_hidden_state[valid])

    def total_loss(self, batch: dict[str, Tensor], hidden: Tensor, heads_total: Tensor,
                   out: dict[str, Tensor]) -> Tensor:
        """base_loss + λ · heads_total; ``out["base_loss"]`` is set."""
        out["base_loss"] = self.base_loss(batch, hidden)
        return out["base_loss"] + self.medusa2_lambda * heads_total

    def base_loss(self, batch: dict[str, Tensor], hidden: Tensor) -> Tensor:
        """Next-token CE of the base head on trainable tokens, or with ``self_distill`` KL(original || base)."""
        input_ids, loss_mask, attention_mask = batch["input_ids"], batch["loss_mask"], batch.get("attention_mask")
        base_labels, base_valid = shifted_labels(input_ids, loss_mask, attention_mask, 1, batch.get("document_ids"))
        lm = self._base_lm()
        n = base_valid.sum().clamp(min=1).to(torch.float32)
        rows = torch.ones(int(base_valid.sum()), device=hidden.device) / n
        if logits_transform(lm.config, type(lm)) is not None:  # post-processed logits (softcap, scaling): unfused
            base_logits = output_logits(lm, hidden[base_valid])
            if self.self_distill:
                teacher = self.original_logits(input_ids, attention_mask, base_valid).float()
                return F.kl_div(F.log_softmax(base_logits, -1), F.log_softmax(teacher, -1), log_target=True,
                                reduction="sum") / n
            return F.cross_entropy(base_logits, base_labels[base_valid], reduction="sum") / n
        if self.self_distill:  # KL(original || base) = CE(original, base) - H(original); the entropy has no gradient
            teacher = torch.softmax(self.original_logits(input_ids, attention_mask, base_valid).float(), -1)
            ce, _ = fused_linear_soft_cross_entropy(hidden[base_valid], lm.get_output_embeddings().weight, teacher,
                                                    row_weights=rows, topk=0)
            entropy = -(teacher * torch.log(teacher.clamp_min(1e-30))).sum(-1)
            return ce - (entropy * rows).sum()
        base_loss, _ = fused_linear_cross_entropy(hidden[base_valid], lm.get_output_embeddings().weight,
                                                  base_labels[base_valid], row_weights=rows, topk=0)
        return base_loss

    # --- decoding and export ------------------------------------------------------------------------
    def trained_target(self) -> FrozenTarget:
        """The jointly trained base (the heads were trained on its features)."""
        return FrozenTarget(self._base_lm(), freeze=False, check_logits=False)

    def export_base(self, out_dir: str) -> tuple[str, Callable[[Path], None] | None, int]:
        """The trained base is written as ``<out_dir>/base`` (size bound: the unmerged state; LoRA adds little)."""
        from spec_lightning.export.common import tensor_bytes

        return f"{out_dir}/{BASE_EXPORT_DIR}", self._write_base, tensor_bytes(self._base_lm().state_dict())

    def export_draft(self, out_dir: str, layout: str | None = None, overwrite: bool = False) -> Path:
        """Write the heads (``layout="vllm"`` or ``"original"``) and the base they were trained with.

        The base (LoRA merged into a copy; a plain HF model directory with the tokenizer) is ``<out_dir>/base``: the
        heads were trained on that base's features, so they are served together, e.g. ``vllm serve <out_dir>/base
        --speculative-config '{"method": "medusa", "model": "<out_dir>", "num_speculative_tokens": K}'``.
        """
        out = super().export_draft(out_dir, layout=layout, overwrite=overwrite)
        print(f"Medusa-2: serve the heads with the trained base: vllm serve {out}/{BASE_EXPORT_DIR} "
              f"--speculative-config '{{\"method\": \"medusa\", \"model\": \"{out}\", "
              f"\"num_speculative_tokens\": {self.num_heads}}}'")
        return out

    def _write_base(self, directory: Path) -> None:
        """The trained base as a plain HF model directory (LoRA merged into a copy; the module is unchanged)."""
        from spec_lightning.export.common import check_finite
        from spec_lightning.targets import load_tokenizer

        lm = self._base_lm()
        merged = copy.deepcopy(self.base).merge_and_unload() if self.base_training == "lora" else copy.deepcopy(lm)
        check_finite(dict(merged.state_dict()), "Medusa-2 base export")
        merged.save_pretrained(directory / BASE_EXPORT_DIR)
        load_tokenizer(self.target_source).save_pretrained(directory / BASE_EXPORT_DIR)
