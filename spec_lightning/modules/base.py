"""What every draft-training LightningModule shares: the frozen target, checkpoint filtering, optimisers.

Subclasses implement :meth:`build_draft` (create the trainable draft from the loaded target) and the
training/validation steps. The frozen target is a submodule named ``target`` so Lightning strategies
place, cast and shard it, but it is never optimised and never written into checkpoints.
"""

from __future__ import annotations

from pathlib import Path

import torch
from lightning.pytorch import LightningModule
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor, nn

from spec_lightning.contract import DataLink, DataRequirements, target_dtype_for
from spec_lightning.errors import NonFiniteError
from spec_lightning.speculate.drafter import Drafter
from spec_lightning.targets import FrozenTarget, load_target_model

# LightningCLI injects these from YAML (``class_path: torch.optim.AdamW`` + ``init_args``).
OptimizerFactory = OptimizerCallable
SchedulerFactory = LRSchedulerCallable

TARGET_PREFIX = "target."


def default_optimizer(params) -> torch.optim.Optimizer:
    """AdamW with torch's defaults (lr 1e-3), fused: one pass over each parameter per step instead of foreach's
    parameter-sized temporaries (Medusa 1.37x tokens/s at T = 512 on CPU, benchmarks/results/train_throughput.md)."""
    return torch.optim.AdamW(params, fused=True)


class DraftModule(LightningModule):
    """Base class: a frozen target (loaded in ``configure_model``) plus a trainable draft.

    Args:
        target: target source (builtin name, GGUF file, HF directory or hub id); see ``spec_lightning.targets``.
        target_dtype: dtype the frozen target is loaded in (``float32`` on CPU, ``bfloat16`` on GPUs), or ``auto``:
            the trainer's precision decides (bf16 under bf16-mixed, fp32 otherwise).
        optimizer: callable building the optimiser from the trainable parameters (LightningCLI injects it).
        lr_scheduler: optional callable building a scheduler from the optimiser; stepped every optimiser step.
        on_nonfinite: a non-finite training loss ``"error"`` (default: stop the run naming step, batch and quantity,
            non-zero exit) or ``"skip"`` (skip the batch, counted in ``train_skipped_batches``). A non-finite
            gradient under a finite loss always stops the run.
    """

    strict_loading = False  # checkpoints hold the draft only; the target is always reloaded from its source

    def __init__(
        self,
        target: str = "smollm2-135m-instruct",
        target_dtype: str = "float32",
        optimizer: OptimizerFactory = default_optimizer,
        lr_scheduler: SchedulerFactory | None = None,
        on_nonfinite: str = "error",
    ) -> None:
        super().__init__()
        if on_nonfinite not in ("error", "skip"):
            raise ValueError(f"on_nonfinite must be 'error' or 'skip', got {on_nonfinite!r}")
        if target_dtype != "auto" and not isinstance(getattr(torch, target_dtype, None), torch.dtype):
            raise ValueError(f"target_dtype {target_dtype!r} is not a torch dtype (e.g. 'float32', 'bfloat16') or 'auto'")
        self.target_source = target
        self._target_dtype = target_dtype
        self.optimizer_factory = optimizer
        self.scheduler_factory = lr_scheduler
        self.on_nonfinite = on_nonfinite
        self.skipped_batches = 0
        self.target: FrozenTarget | None = None

    @property
    def target_dtype(self) -> torch.dtype:
        """The frozen target's dtype; ``"auto"`` follows the trainer's precision (bf16 under bf16-mixed, else fp32)."""
        trainer = self._trainer
        return target_dtype_for(self._target_dtype, trainer.precision if trainer is not None else None)

    # --- what the data must provide (spec_lightning.contract) ----------------------------------------------
    def data_requirements(self) -> DataRequirements:
        """What this module needs from its data: the target, its dtype, the target layers it reads (its
        ``aux_layer_ids`` hyper-parameter, if it has one), its heads (``num_heads``) and whether it trains the target
        (``trains_target``). Subclasses override where that differs."""
        aux: str | list[int] = "none"
        if "aux_layer_ids" in self.hparams:
            ids = self.hparams["aux_layer_ids"]
            aux = "default" if ids is None else [int(i) for i in ids]
        trains_target = getattr(self, "trains_target", False)  # a module that trains its target says so
        heads = getattr(self, "num_heads", None)
        return DataRequirements(target=self.target_source, target_dtype=self._target_dtype, aux_layers=aux,
                                num_heads=None if heads is None else int(heads), trains_target=bool(trains_target))

    @property
    def data_link(self) -> DataLink:
        """The wire to this module's datamodule: :meth:`data_requirements` out, the data's products back (the CLI
        hands it to the datamodule; in Python pass ``link=module.data_link`` to the datamodule)."""
        link = self.__dict__.get("_data_link")
        if link is None:
            link = self.__dict__["_data_link"] = DataLink(self.data_requirements())
        return link

    # --- model construction -------------------------------------------------------------------------
    def load_target(self) -> nn.Module:
        """The HF model for ``self.target_source``; overridable (tests inject tiny random targets)."""
        return load_target_model(self.target_source, dtype=self.target_dtype)

    def configure_model(self) -> None:
        """Idempotent: load the frozen target and build the draft once.

        When the datamodule provides the target's features (offline: batches carry the target's cached features) only
        the frozen pieces the loss needs are loaded (:meth:`load_target_head`), never the whole target.
        """
        if self.target is None:
            if self.offline():
                self.target = self.load_target_head()
            else:
                model = self.load_target()
                if model.get_input_embeddings().weight.dtype != self.target_dtype:
                    model.to(self.target_dtype)  # a model built elsewhere (tests, subclasses) in another dtype
                self.target = FrozenTarget(model)
            self.build_draft(self.target)

    def offline(self) -> bool:
        """Whether training reads cached target features (the datamodule said so on :attr:`data_link`) instead of
        running the target."""
        return self.data_link.target_features

    def load_target_head(self) -> FrozenTarget:
        """The target's embeddings, final norm and lm_head only (offline training); see ``targets.head``."""
        from spec_lightning.targets.head import load_target_head

        return load_target_head(self.target_source, dtype=self.target_dtype)

    def target_features(self, batch: dict[str, Tensor], aux_layer_ids: tuple[int, ...] | list[int] = ()):
        """The target's features for a batch: cached in the batch (offline: ``aux_hidden``/``final_hidden``) or from
        one frozen target forward (online)."""
        from spec_lightning.targets import TargetFeatures

        if "final_hidden" in batch:
            aux = batch.get("aux_hidden")
            if aux_layer_ids and aux is None:
                raise ValueError("the cached features hold no aux hidden states; rebuild the cache with the draft's "
                                 f"aux layers {list(aux_layer_ids)}")
            return TargetFeatures(aux_hidden=aux, final_hidden=batch["final_hidden"])
        assert self.target is not None
        return self.target(batch["input_ids"], batch.get("attention_mask"), aux_layer_ids=aux_layer_ids,
                           position_ids=batch.get("position_ids"))

    def build_draft(self, target: FrozenTarget) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    # --- decoding and export: how each algorithm is used after training -----------------------------
    def make_drafter(self, tree_topk: int = 4, tree_depth: int = 5, tree_total_tokens: int = 24) -> Drafter:
        """The draft bound for lossless speculative decoding (``spec_lightning.speculate``); tree settings apply
        where the algorithm builds dynamic trees."""
        raise NotImplementedError(f"{type(self).__name__} does not say how it is decoded (make_drafter)")

    def decode_target(self) -> FrozenTarget:
        """The model that verifies drafts: the frozen target (Medusa-2: its jointly trained base)."""
        self.configure_model()
        assert self.target is not None
        return self.target

    def export_draft(self, out_dir: str, layout: str | None = None, overwrite: bool = False) -> Path:
        """Write the trained draft in a serving layout (see ``spec_lightning.export``)."""
        raise NotImplementedError(f"{type(self).__name__} has no serving export")

    def load_export(self, directory: str) -> None:
        """Replace the draft by an exported one (the inverse of :meth:`export_draft`), for ``evaluate --draft_dir``."""
        raise NotImplementedError(f"{type(self).__name__} cannot read exports")

    # --- checkpoints --------------------------------------------------------------------------------
    def keep_in_checkpoint(self, key: str) -> bool:
        """Whether a state-dict key is written into checkpoints (default: everything outside the frozen target)."""
        return not key.startswith(TARGET_PREFIX)

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        """A checkpoint resumed into this module must have been trained with the same settings (each conflict named;
        the CLI checks explicit paths before instantiation, this covers ``--ckpt_path last`` and the Python API)."""
        from spec_lightning.checkpoints import checkpoint_conflicts

        saved = {k: v for k, v in (checkpoint.get("hyper_parameters") or {}).items() if not k.startswith("_")}
        conflicts = checkpoint_conflicts(saved, {"init_args": dict(self.hparams)})
        if conflicts:
            raise ValueError(f"the checkpoint and the configured model disagree on {'; '.join(conflicts)}")

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        state = checkpoint.get("state_dict", {})
        for key in [k for k in state if not self.keep_in_checkpoint(k)]:
            del state[key]

    def train(self, mode: bool = True) -> DraftModule:
        super().train(mode)
        if self.target is not None:
            self.target.eval()  # frozen target stays in eval mode (no dropout) whatever Lightning asks
        return self

    # --- numerical guard ----------------------------------------------------------------------------
    def guard_loss(self, loss: Tensor, batch_idx: int, name: str = "train_loss") -> Tensor | None:
        """``loss`` if finite; otherwise stop the run (``on_nonfinite="error"``) or skip the batch (returns ``None``,
        which makes Lightning skip backward and the optimiser step)."""
        if bool(torch.isfinite(loss.detach()).all()):
            return loss
        message = (f"{name} is {loss.detach().float().item()} at global step {self.global_step}, epoch "
                   f"{self.current_epoch}, batch index {batch_idx}")
        if self.on_nonfinite == "error":
            raise NonFiniteError(f"{message}: stopping (lower the learning rate, check the data, or set "
                                 "model.init_args.on_nonfinite: skip to skip such batches)")
        if self.trainer.world_size > 1:
            raise NonFiniteError(f"{message}: on_nonfinite 'skip' works in single-process runs only (ranks would "
                                 "disagree on the step); stopping")
        self.skipped_batches += 1
        rank_zero_warn(f"{message}: batch skipped ({self.skipped_batches} so far)")
        self.log("train_skipped_batches", float(self.skipped_batches))
        return None

    def on_before_optimizer_step(self, optimizer) -> None:
        names = {id(p): n for n, p in self.named_parameters()}
        named = [(names.get(id(p), "?"), p.grad) for group in optimizer.param_groups for p in group["params"]
                 if p.grad is not None]
        if not named:
            return
        norms = torch._foreach_norm([g for _, g in named])
        if bool(torch.isfinite(torch.stack(norms)).all()):
            return
        where = f"at global step {self.global_step}, epoch {self.current_epoch}"
        bad = [n for n, g in named if not bool(torch.isfinite(g).all())]
        if bad:
            raise NonFiniteError(f"non-finite gradient {where} in {', '.join(bad[:5])}{' ...' if len(bad) > 5 else ''}"
                                 " (the loss was finite): stopping")
        # every value is finite, but a norm overflowed: the gradients are huge (the run is diverging)
        overflowed = [n for (n, _), norm in zip(named, norms) if not bool(torch.isfinite(norm))]
        largest = max(named, key=lambda item: float(item[1].abs().max()))
        raise NonFiniteError(f"gradient norm overflow {where}: every gradient value is finite, but the norm of "
                             f"{', '.join(overflowed[:3])}{' ...' if len(overflowed) > 3 else ''} exceeds the float "
                             f"range (largest |gradient| {float(largest[1].abs().max()):.3g} in {largest[0]}; the loss "
                             "was finite): stopping (lower the learning rate)")

    # --- optimisation -------------------------------------------------------------------------------
    def trainable_parameters(self) -> list[nn.Parameter]:
        """Parameters the optimiser sees: everything trainable outside the frozen target."""
        return [p for n, p in self.named_parameters() if p.requires_grad and not n.startswith(TARGET_PREFIX)]

    def param_groups(self) -> list[dict] | list[nn.Parameter]:
        """Override to give parameter groups; a group's optional ``lr_scale`` multiplies the optimiser's lr."""
        return self.trainable_parameters()

    def decay_groups(self) -> list[dict]:
        """:meth:`param_groups` with each group split into weight-decayed matrices and non-decayed vectors (norm
        weights, biases), as nanoGPT and litgpt do: the optimiser's ``weight_decay`` never shrinks a norm or bias."""
        groups = self.param_groups()
        if groups and not isinstance(groups[0], dict):
            groups = [{"params": list(groups)}]
        out = []
        for group in groups:
            params = list(group["params"])
            matrices, vectors = [p for p in params if p.dim() >= 2], [p for p in params if p.dim() < 2]
            if matrices:
                out.append({**group, "params": matrices})
            if vectors:
                out.append({**group, "params": vectors, "weight_decay": 0.0})
        return out

    def configure_optimizers(self):
        optimizer = self.optimizer_factory(self.decay_groups())
        for group in optimizer.param_groups:  # a group may scale the injected optimizer's lr (``lr_scale``)
            group["lr"] = group["lr"] * group.get("lr_scale", 1.0)
        if self.scheduler_factory is None:
            return optimizer
        scheduler = self.scheduler_factory(optimizer)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
