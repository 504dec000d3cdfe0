"""What Medusa-1 and Medusa-2 share: K heads on a model's final hidden state, their losses, metrics, decoding, export.

Shift (as in the original FasterDecoding training code): the base lm_head at position t predicts token t+1,
head h (0-based) at position t predicts token ``t + 2 + h``. A (head, position) pair is trained iff the
*predicted* token is trainable (``loss_mask == 1``) and inside the sequence (``attention_mask == 1``).
Each head's cross-entropy is the mean over its valid positions; logits are only computed at those
positions (``[N, V]`` instead of ``[B, T, V]`` per head), which keeps the K full-vocabulary heads lean.

The two algorithms (SPEC §4) differ in the model under the heads: :class:`~spec_lightning.modules.medusa1.Medusa1Module`
reads the frozen target, :class:`~spec_lightning.modules.medusa2.Medusa2Module` trains that base jointly.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Literal

import torch
from torch import Tensor

from spec_lightning.drafts.medusa import MedusaConfig, MedusaHeads
from spec_lightning.losses import fused_linear_cross_entropy, shifted_labels
from spec_lightning.metrics import PositionAccuracy
from spec_lightning.modules.base import DraftModule, OptimizerFactory, SchedulerFactory, default_optimizer
from spec_lightning.speculate.medusa import MedusaDrafter
from spec_lightning.targets import FrozenTarget
from spec_lightning.targets.layout import text_config

BASE_EXPORT_DIR = "base"  # Medusa-2 exports: the jointly trained base beside the heads
DECAY = 0.8  # per-head weight decay 0.8^h of the Medusa paper (Medusa-2 default)


def medusa_head_labels(
    input_ids: Tensor, loss_mask: Tensor, attention_mask: Tensor | None, num_heads: int,
    document_ids: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Head h (0-based) at position t predicts token t + 2 + h: ``(labels [K, B, T], valid [K, B, T])``."""
    pairs = [shifted_labels(input_ids, loss_mask, attention_mask, 2 + h, document_ids) for h in range(num_heads)]
    return torch.stack([p[0] for p in pairs]), torch.stack([p[1] for p in pairs])


def resolve_head_weights(head_weights: str | list[float] | None, num_heads: int,
                         default: Literal["uniform", "decay"] = "uniform") -> list[float]:
    """``"uniform"`` -> 1, ``"decay"`` -> 0.8^h, a list -> itself; ``None`` -> ``default``."""
    if head_weights is None:
        head_weights = default
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


class MedusaHeadsModule(DraftModule):
    """Base class of the Medusa modules: the heads, their losses and logging, decoding and export.

    Subclasses say which model the heads read (:meth:`base_forward`), what the optimiser sees (:meth:`param_groups`),
    which model verifies drafts (:meth:`trained_target`) and how the total loss is formed (:meth:`total_loss`).

    Args:
        target: target source (builtin name, GGUF file, HF directory or hub id).
        target_dtype: dtype the target is loaded in.
        optimizer: optimiser factory (LightningCLI injects it).
        lr_scheduler: optional scheduler factory, stepped every optimiser step.
        on_nonfinite: a non-finite loss ``"error"`` (stop, non-zero exit) or ``"skip"`` (skip and count the batch).
        num_heads: K Medusa heads (head h predicts token t+2+h).
        num_layers: residual blocks per head.
        head_weights: "uniform", "decay" (0.8^h) or K floats (``None``: the subclass's default).
    """

    default_head_weights: Literal["uniform", "decay"] = "uniform"
    trains_target = False  # whether the model under the heads is trained (its features change every step)

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
    ) -> None:
        super().__init__(target=target, target_dtype=target_dtype, optimizer=optimizer, lr_scheduler=lr_scheduler,
                         on_nonfinite=on_nonfinite)
        if num_heads < 1 or num_layers < 1:
            raise ValueError(f"num_heads and num_layers must be >= 1, got {num_heads} and {num_layers}")
        # every class's settings (subclasses' too: Lightning reads each __init__ frame); primitives only: callables in
        # hparams would make checkpoints unloadable with torch.load(weights_only=True)
        self.save_hyperparameters(ignore=["optimizer", "lr_scheduler"])
        self.num_heads = num_heads
        self.num_layers = num_layers
        self.head_weights = resolve_head_weights(head_weights, num_heads, self.default_head_weights)
        self.heads: MedusaHeads | None = None
        self._exported_base: FrozenTarget | None = None  # set by load_export from a Medusa-2 export
        self.train_top1 = PositionAccuracy(num_heads)
        self.train_top5 = PositionAccuracy(num_heads)
        self.val_top1 = PositionAccuracy(num_heads)
        self.val_top5 = PositionAccuracy(num_heads)

    # --- what subclasses say --------------------------------------------------------------------------------
    def base_forward(self, input_ids: Tensor, attention_mask: Tensor | None,
                     batch: dict[str, Tensor] | None = None) -> Tensor:
        """The final post-norm hidden state ``[B, T, H]`` the heads read."""
        raise NotImplementedError

    def trained_target(self) -> FrozenTarget:
        """The model the heads were trained on, which verifies their drafts."""
        raise NotImplementedError

    def total_loss(self, batch: dict[str, Tensor], hidden: Tensor, heads_total: Tensor,
                   out: dict[str, Tensor]) -> Tensor:
        """The training loss from the heads' weighted sum ``heads_total`` (may add entries, e.g. ``base_loss``)."""
        raise NotImplementedError

    # --- model construction -------------------------------------------------------------------------
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

    def head_parameters(self) -> list:
        assert self.heads is not None, "configure_model() must run before configure_optimizers()"
        return [p for p in self.heads.parameters() if p.requires_grad]

    # --- forward ------------------------------------------------------------------------------------
    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        """Medusa logits ``[K, B, T, V]`` (head h at position t scores token t+2+h; full grids, for small inputs)."""
        hidden = self.base_forward(input_ids, attention_mask)
        return self.heads(hidden.to(self.heads.lm_heads[0].weight.dtype))

    def compute_losses(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        """Per-head CE and accuracy counts, and the total loss (:meth:`total_loss`).

        Returns ``loss`` (total), ``head_losses [K]``, ``top1 [K, B, T]``, ``top5 [K, B, T]``, ``valid [K, B, T]``
        and, in Medusa-2, ``base_loss``. Each head's logits exist only at its valid positions, ``chunk`` rows at a
        time (fused, chunked CE): never a ``[B, T, V]`` grid per head.
        """
        input_ids, loss_mask = batch["input_ids"], batch["loss_mask"]
        attention_mask = batch.get("attention_mask")
        hidden = self.base_forward(input_ids, attention_mask, batch)  # [B, T, H]
        labels, valid = medusa_head_labels(input_ids, loss_mask, attention_mask, self.num_heads,
                                           batch.get("document_ids"))
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
        out = {"head_losses": head_losses, "top1": top1, "top5": top5, "valid": valid}
        out["loss"] = self.total_loss(batch, hidden, (weights * head_losses).sum(), out)
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
        """The model the heads were trained on (:meth:`trained_target`), or the base read back from a Medusa-2 export
        (:meth:`load_export`)."""
        self.configure_model()
        if self._exported_base is not None:
            return self._exported_base
        return self.trained_target()

    def export_base(self, out_dir: str) -> tuple[str, Callable[[Path], None] | None, int]:
        """``(base_model_name_or_path, writer of extra files, their size bound in bytes)`` for :meth:`export_draft`:
        by default the target the heads read, nothing more written."""
        return self.target_source, None, 0

    def export_draft(self, out_dir: str, layout: str | None = None, overwrite: bool = False) -> Path:
        """Write the heads for serving: ``layout="vllm"`` (MedusaModel) or ``"original"`` (FasterDecoding)."""
        from spec_lightning.export.medusa import write_medusa

        self.configure_model()
        assert self.heads is not None
        base_name, extra, extra_bytes = self.export_base(out_dir)
        return write_medusa(out_dir, self.heads.state_dict(), self.medusa_config, layout=layout or "vllm",
                            base_model_name_or_path=base_name, overwrite=overwrite, extra_writer=extra,
                            extra_bytes=extra_bytes)

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
        elif self.trains_target:
            raise ValueError(f"{directory}: a Medusa-2 export holds its trained base in {BASE_EXPORT_DIR}/; it is "
                             "missing (heads trained with a jointly trained base cannot be judged on the original)")
        device = self.decode_target().device
        self.heads = heads.to(device)
