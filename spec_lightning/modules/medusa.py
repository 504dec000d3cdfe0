"""MedusaModule: train Medusa heads on a target (Medusa-1), or heads and base jointly (Medusa-2). SPEC §4.

Shift (as in the original FasterDecoding training code): the base lm_head at position t predicts token t+1,
head h (0-based) at position t predicts token ``t + 2 + h``. A (head, position) pair is trained iff the
*predicted* token is trainable (``loss_mask == 1``) and inside the sequence (``attention_mask == 1``).
Each head's cross-entropy is the mean over its valid positions; logits are only computed at those
positions (``[N, V]`` instead of ``[B, T, V]`` per head), which keeps the K full-vocabulary heads lean.

Medusa-1 (``mode="medusa1"``): the target is frozen (``self.target``, never optimised, never saved);
loss = Σ_h w_h · CE_h with ``head_weights`` "uniform" (w_h = 1, default), "decay" (0.8^h) or a list.

Medusa-2 (``mode="medusa2"``): the base model is trained too and lives in ``self.base`` (LoRA adapters via
peft, or full fine-tuning). loss = base_loss + ``medusa2_lambda`` · Σ_h w_h · CE_h (w_h default "decay"),
where base_loss is the next-token CE on trainable tokens, or with ``self_distill`` the KL divergence
KL(p_original || p_base) of the base head to the frozen original model (the Medusa paper's
self-distillation, for data the target did not generate). The heads' learning rate is
``head_lr_multiplier`` × the injected optimiser's lr (the base groups use that lr as is). With LoRA the
original model is the same network with adapters disabled; with full fine-tuning a frozen copy is kept
in ``self.target`` (never saved). Checkpoints hold the heads plus the LoRA adapters (or the full base).
"""

from __future__ import annotations

import copy
import math
from pathlib import Path
from typing import Literal

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from spec_lightning.drafts.medusa import MedusaConfig, MedusaHeads
from spec_lightning.losses import fused_linear_cross_entropy, fused_linear_soft_cross_entropy, shifted_labels
from spec_lightning.metrics import PositionAccuracy
from spec_lightning.modules.base import (
    TARGET_PREFIX,
    DraftModule,
    OptimizerFactory,
    SchedulerFactory,
    default_optimizer,
)
from spec_lightning.speculate.medusa import MedusaDrafter
from spec_lightning.targets import FrozenTarget
from spec_lightning.targets.layout import (
    attention_projection_targets,
    base_model,
    logits_transform,
    output_logits,
    text_config,
)

BASE_PREFIX = "base."
BASE_EXPORT_DIR = "base"  # Medusa-2 exports: the jointly trained base beside the heads
DECAY = 0.8  # per-head weight decay 0.8^h of the Medusa paper (Medusa-2 default)


def medusa_head_labels(
    input_ids: Tensor, loss_mask: Tensor, attention_mask: Tensor | None, num_heads: int,
    document_ids: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Head h (0-based) at position t predicts token t + 2 + h: ``(labels [K, B, T], valid [K, B, T])``."""
    pairs = [shifted_labels(input_ids, loss_mask, attention_mask, 2 + h, document_ids) for h in range(num_heads)]
    return torch.stack([p[0] for p in pairs]), torch.stack([p[1] for p in pairs])


def resolve_head_weights(head_weights: str | list[float] | None, num_heads: int, mode: str) -> list[float]:
    """``"uniform"`` -> 1, ``"decay"`` -> 0.8^h, a list -> itself; ``None`` -> uniform (Medusa-1) / decay (Medusa-2)."""
    if head_weights is None:
        head_weights = "uniform" if mode == "medusa1" else "decay"
    if isinstance(head_weights, str):
        if head_weights == "uniform":
            return [1.0] * num_heads
        if head_weights == "decay":
            return [DECAY**h for h in range(num_heads)]
        raise ValueError(f"head_weights must be 'uniform', 'decay' or a list of {num_heads} floats, got {head_weights!r}")
    weights = [float(w) for w in head_weights]
    if len(weights) != num_heads or any(w < 0 or not math.isfinite(w) for w in weights):
        raise ValueError(f"head_weights must be {num_heads} finite non-negative floats (num_heads), got {head_weights}")
    return weights


class MedusaModule(DraftModule):
    """Medusa-1 / Medusa-2 training on an online (frozen or jointly trained) target.

    Args:
        target: target source (builtin name, GGUF file, HF directory or hub id).
        target_dtype: dtype the target is loaded in.
        optimizer: optimiser factory (LightningCLI injects it); its lr is the base lr in Medusa-2.
        lr_scheduler: optional scheduler factory, stepped every optimiser step.
        on_nonfinite: a non-finite loss ``"error"`` (stop, non-zero exit) or ``"skip"`` (skip and count the batch).
        num_heads: K Medusa heads (head h predicts token t+2+h).
        num_layers: residual blocks per head.
        head_weights: "uniform", "decay" (0.8^h) or K floats; default uniform (Medusa-1) / decay (Medusa-2).
        mode: "medusa1" (heads only, target frozen) or "medusa2" (base and heads jointly).
        medusa2_lambda: Medusa-2 weight λ of the heads' loss against the base loss (weight 1).
        head_lr_multiplier: Medusa-2 heads' lr = this × the optimiser's lr.
        base_training: Medusa-2 base training: "lora" (peft adapters) or "full" fine-tuning.
        lora_r: LoRA rank.
        lora_alpha: LoRA alpha (scaling alpha / r).
        lora_dropout: LoRA dropout.
        lora_target_modules: module names LoRA adapts (default: every decoder block's attention projections, found
            per family).
        self_distill: Medusa-2 base loss = KL(original || base) on the base head instead of next-token CE.
    """

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
        mode: Literal["medusa1", "medusa2"] = "medusa1",
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
                         on_nonfinite=on_nonfinite)
        if mode not in ("medusa1", "medusa2"):
            raise ValueError(f"mode must be 'medusa1' or 'medusa2', got {mode!r}")
        if base_training not in ("lora", "full"):
            raise ValueError(f"base_training must be 'lora' or 'full', got {base_training!r}")
        if num_heads < 1 or num_layers < 1:
            raise ValueError(f"num_heads and num_layers must be >= 1, got {num_heads} and {num_layers}")
        if medusa2_lambda < 0 or head_lr_multiplier <= 0:
            raise ValueError(
                f"medusa2_lambda must be >= 0 and head_lr_multiplier > 0, got {medusa2_lambda} and {head_lr_multiplier}"
            )
        if lora_r < 1:
            raise ValueError(f"lora_r must be >= 1, got {lora_r}")
        # primitives only: callables in hparams would make checkpoints unloadable with torch.load(weights_only=True)
        self.save_hyperparameters(ignore=["optimizer", "lr_scheduler"])
        self.num_heads = num_heads
        self.num_layers = num_layers
        self.mode = mode
        self.head_weights = resolve_head_weights(head_weights, num_heads, mode)
        self.medusa2_lambda = medusa2_lambda
        self.head_lr_multiplier = head_lr_multiplier
        self.base_training = base_training
        self.lora_target_modules = list(lora_target_modules or ["q_proj", "k_proj", "v_proj", "o_proj"])
        self.self_distill = self_distill
        self.heads: MedusaHeads | None = None
        self.base: nn.Module | None = None  # Medusa-2 only: the trainable base (peft-wrapped for LoRA)
        self._exported_base: FrozenTarget | None = None  # set by load_export from a Medusa-2 export
        self.train_top1 = PositionAccuracy(num_heads)
        self.train_top5 = PositionAccuracy(num_heads)
        self.val_top1 = PositionAccuracy(num_heads)
        self.val_top5 = PositionAccuracy(num_heads)

    # --- model construction -------------------------------------------------------------------------
    def configure_model(self) -> None:
        """Medusa-1: the base class's frozen target. Medusa-2: a trainable base (+ frozen copy if needed)."""
        if self.mode == "medusa1":
            super().configure_model()
            return
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

    def build_draft(self, target: FrozenTarget) -> None:
        self._build_heads(target.lm_head.weight, target.config)

    def _build_heads(self, lm_head_weight: Tensor, config) -> None:
        config = text_config(config)
        cfg = MedusaConfig(
            hidden_size=int(config.hidden_size), vocab_size=int(config.vocab_size),
            num_heads=self.num_heads, num_layers=self.num_layers,
        )
        self.medusa_config = cfg
        with torch.device(lm_head_weight.device):  # fp32 master weights whatever the target dtype
            heads = MedusaHeads(cfg)
        if lm_head_weight.device.type != "meta":
            heads.init_from_lm_head(lm_head_weight.detach())
        self.heads = heads

    def _base_lm(self) -> nn.Module:
        """The HF causal LM trained in Medusa-2 (under the peft wrapper for LoRA)."""
        assert self.base is not None
        return self.base.get_base_model() if self.base_training == "lora" else self.base

    # --- checkpoints and optimisation ---------------------------------------------------------------
    def keep_in_checkpoint(self, key: str) -> bool:
        if key.startswith(TARGET_PREFIX):
            return False  # frozen target (Medusa-1) or frozen original copy (Medusa-2 full + self_distill)
        if key.startswith(BASE_PREFIX) and self.base_training == "lora":
            return "lora_" in key  # adapters only; the frozen base weights are reloaded from the source
        return True

    def param_groups(self) -> list[dict] | list[nn.Parameter]:
        assert self.heads is not None, "configure_model() must run before configure_optimizers()"
        head_params = [p for p in self.heads.parameters() if p.requires_grad]
        if self.mode == "medusa1":
            return head_params
        base_params = [p for p in self.base.parameters() if p.requires_grad]
        return [
            {"params": base_params, "name": "base"},
            {"params": head_params, "name": "heads", "lr_scale": self.head_lr_multiplier},
        ]

    # --- forward ------------------------------------------------------------------------------------
    def base_forward(self, input_ids: Tensor, attention_mask: Tensor | None,
                     batch: dict[str, Tensor] | None = None) -> Tensor:
        """Final post-norm hidden state ``[B, T, H]``: frozen (Medusa-1, no grad; cached in the batch offline) or
        trainable (Medusa-2)."""
        if self.mode == "medusa1":
            batch = batch if batch is not None else {"input_ids": input_ids, "attention_mask": attention_mask}
            return self.target_features(batch).final_hidden
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

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        """Medusa logits ``[K, B, T, V]`` (head h at position t scores token t+2+h; full grids, for small inputs)."""
        hidden = self.base_forward(input_ids, attention_mask)
        return self.heads(hidden.to(self.heads.lm_heads[0].weight.dtype))

    def compute_losses(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        """Per-head CE and accuracy counts; in Medusa-2 also the base loss.

        Returns ``loss`` (total), ``head_losses [K]``, ``top1 [K, B, T]``, ``top5 [K, B, T]``, ``valid [K, B, T]``
        and, in Medusa-2, ``base_loss``. Each head's logits exist only at its valid positions, ``chunk`` rows at a
        time (fused, chunked CE): never a ``[B, T, V]`` grid per head.
        """
        input_ids, loss_mask = batch["input_ids"], batch["loss_mask"]
        attention_mask = batch.get("attention_mask")
        hidden = self.base_forward(input_ids, attention_mask, batch)  # [B, T, H]
        document_ids = batch.get("document_ids")
        labels, valid = medusa_head_labels(input_ids, loss_mask, attention_mask, self.num_heads, document_ids)
        head_hidden = hidden.to(self.heads.lm_heads[0].weight.dtype)
        top1 = torch.zeros_like(valid)
        top5 = torch.zeros_like(valid)
        losses = []
        for h in range(self.num_heads):
            x = self.heads.head_hidden(head_hidden[valid[h]], h)  # [N, H]: positions whose predicted token trains
            y = labels[h][valid[h]]
            n = valid[h].sum().clamp(min=1).to(torch.float32)
            loss, best = fused_linear_cross_entropy(x, self.heads.lm_heads[h].weight, y,
                                                    row_weights=torch.ones_like(y, dtype=torch.float32) / n,
                                                    topk=min(5, self.heads.config.vocab_size))
            losses.append(loss)
            with torch.no_grad():
                top1[h][valid[h]] = best[:, 0] == y
                top5[h][valid[h]] = (best == y[:, None]).any(-1)
        head_losses = torch.stack(losses)
        weights = torch.tensor(self.head_weights, device=head_losses.device, dtype=head_losses.dtype)
        heads_total = (weights * head_losses).sum()
        out = {"head_losses": head_losses, "top1": top1, "top5": top5, "valid": valid}
        if self.mode == "medusa1":
            out["loss"] = heads_total
            return out
        base_labels, base_valid = shifted_labels(input_ids, loss_mask, attention_mask, 1, document_ids)
        lm = self._base_lm()
        n = base_valid.sum().clamp(min=1).to(torch.float32)
        rows = torch.ones(int(base_valid.sum()), device=hidden.device) / n
        if logits_transform(lm.config, type(lm)) is not None:  # post-processed logits (softcap, scaling): unfused
            base_logits = output_logits(lm, hidden[base_valid])
            if self.self_distill:
                teacher = self.original_logits(input_ids, attention_mask, base_valid).float()
                base_loss = F.kl_div(F.log_softmax(base_logits, -1), F.log_softmax(teacher, -1), log_target=True,
                                     reduction="sum") / n
            else:
                base_loss = F.cross_entropy(base_logits, base_labels[base_valid], reduction="sum") / n
        elif self.self_distill:  # KL(original || base) = CE(original, base) - H(original); the entropy has no gradient
            teacher = torch.softmax(self.original_logits(input_ids, attention_mask, base_valid).float(), -1)
            ce, _ = fused_linear_soft_cross_entropy(hidden[base_valid], lm.get_output_embeddings().weight, teacher,
                                                    row_weights=rows, topk=0)
            entropy = -(teacher * torch.log(teacher.clamp_min(1e-30))).sum(-1)
            base_loss = ce - (entropy * rows).sum()
        else:
            base_loss, _ = fused_linear_cross_entropy(hidden[base_valid], lm.get_output_embeddings().weight,
                                                      base_labels[base_valid], row_weights=rows, topk=0)
        out["base_loss"] = base_loss
        out["loss"] = base_loss + self.medusa2_lambda * heads_total
        return out

    # --- Lightning hooks ----------------------------------------------------------------------------
    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor | None:
        out = self.compute_losses(batch)
        bs = batch["input_ids"].shape[0]
        # this batch's accuracy [K] (torchmetrics squeezes K = 1 to a scalar); the state accumulates too
        top1 = self.train_top1(out["top1"], out["valid"]).reshape(-1)
        top5 = self.train_top5(out["top5"], out["valid"]).reshape(-1)
        self.log("train_loss", out["loss"].float(), prog_bar=True, batch_size=bs)
        if "base_loss" in out:
            self.log("train_loss_base", out["base_loss"].float(), batch_size=bs)
        for h in range(self.num_heads):
            self.log(f"train_loss_head{h}", out["head_losses"][h].float(), batch_size=bs)
            self.log(f"train_top1_head{h}", top1[h].float(), batch_size=bs)
            self.log(f"train_top5_head{h}", top5[h].float(), batch_size=bs)
        return self.guard_loss(out["loss"], batch_idx)

    def on_train_epoch_end(self) -> None:
        self.train_top1.reset()
        self.train_top5.reset()

    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        out = self.compute_losses(batch)
        bs = batch["input_ids"].shape[0]
        self.val_top1.update(out["top1"], out["valid"])
        self.val_top5.update(out["top5"], out["valid"])
        self.log("val_loss", out["loss"].float(), prog_bar=True, batch_size=bs, sync_dist=True)
        if "base_loss" in out:
            self.log("val_loss_base", out["base_loss"].float(), batch_size=bs, sync_dist=True)
        for h in range(self.num_heads):
            self.log(f"val_loss_head{h}", out["head_losses"][h].float(), batch_size=bs, sync_dist=True)

    def on_validation_epoch_end(self) -> None:
        top1 = self.val_top1.compute().reshape(-1)  # every rank calls compute()
        top5 = self.val_top5.compute().reshape(-1)
        for h in range(self.num_heads):
            self.log(f"val_top1_head{h}", top1[h].item())
            self.log(f"val_top5_head{h}", top5[h].item())
        self.val_top1.reset()
        self.val_top5.reset()

    # --- decoding and export ------------------------------------------------------------------------
    def make_drafter(self, tree_topk: int = 4, tree_depth: int = 5, tree_total_tokens: int = 24) -> MedusaDrafter:
        """Medusa heads decode with their sparse tree of top-k choices (the dynamic-tree settings do not apply)."""
        self.configure_model()
        assert self.heads is not None
        return MedusaDrafter(self.heads)

    def decode_target(self) -> FrozenTarget:
        """Medusa-1: the frozen target. Medusa-2: the jointly trained base (the heads were trained on its features),
        or the base read back from an export (:meth:`load_export`)."""
        self.configure_model()
        if self._exported_base is not None:
            return self._exported_base
        if self.mode == "medusa2":
            return FrozenTarget(self._base_lm(), freeze=False, check_logits=False)
        assert self.target is not None
        return self.target

    def export_draft(self, out_dir: str, layout: str | None = None, overwrite: bool = False) -> Path:
        """Write the heads for serving: ``layout="vllm"`` (MedusaModel) or ``"original"`` (FasterDecoding).

        Medusa-2 also writes the base it trained with (LoRA merged into a copy; a plain HF model directory with the
        tokenizer) as ``<out_dir>/base``: the heads were trained on that base's features, so they are served
        together, e.g. ``vllm serve <out_dir>/base --speculative-config '{"method": "medusa", "model": "<out_dir>",
        "num_speculative_tokens": K}'``.
        """
        from spec_lightning.export.common import tensor_bytes
        from spec_lightning.export.medusa import write_medusa

        self.configure_model()
        assert self.heads is not None
        layout = layout or "vllm"
        base_name = self.target_source if self.mode == "medusa1" else f"{out_dir}/{BASE_EXPORT_DIR}"
        extra = self._write_base if self.mode == "medusa2" else None
        extra_bytes = tensor_bytes(self._base_lm().state_dict()) if self.mode == "medusa2" else 0  # LoRA: a bound
        out = write_medusa(out_dir, self.heads.state_dict(), self.medusa_config, layout=layout,
                           base_model_name_or_path=base_name, overwrite=overwrite, extra_writer=extra,
                           extra_bytes=extra_bytes)
        if self.mode == "medusa2":
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

    def load_export(self, directory: str) -> None:
        """Put exported heads (either layout) in place of the trained ones; a Medusa-2 export's ``base/`` becomes the
        model that verifies them."""
        from spec_lightning.export.medusa import load_medusa_heads
        from spec_lightning.targets import load_target_model

        self.configure_model()
        heads = load_medusa_heads(directory)
        cfg = text_config(self.decode_target().config)
        c = heads.config
        if (c.hidden_size, c.vocab_size) != (int(cfg.hidden_size), int(cfg.vocab_size)):
            raise ValueError(f"{directory}: Medusa heads have hidden_size={c.hidden_size}, vocab_size={c.vocab_size}; "
                             f"the target has {cfg.hidden_size}, {cfg.vocab_size}")
        base_dir = Path(directory) / BASE_EXPORT_DIR
        if base_dir.is_dir():
            self._exported_base = FrozenTarget(load_target_model(str(base_dir), dtype=self.target_dtype))
        elif self.mode == "medusa2":
            raise ValueError(f"{directory}: a Medusa-2 export holds its trained base in {BASE_EXPORT_DIR}/; it is "
                             "missing (heads trained with a jointly trained base cannot be judged on the original)")
        device = self.decode_target().device
        self.heads = heads.to(device)
