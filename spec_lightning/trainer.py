"""Trainer with the extra subcommands LightningCLI exposes (``python cli.py export ...``).

LightningCLI builds a subcommand's parser from the Trainer method of the same name, so extra
subcommands are methods here; ``fit``/``validate`` stay Lightning's own.
"""

from __future__ import annotations

from pathlib import Path

import torch
from lightning.pytorch import LightningDataModule, LightningModule, Trainer


def load_draft_weights(module: LightningModule, ckpt_path: str | Path) -> None:
    """Load a draft checkpoint's weights into ``module`` (target reloaded from its source, never from the file)."""
    ckpt_path = Path(ckpt_path)
    if not ckpt_path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {ckpt_path}")
    try:
        checkpoint = torch.load(ckpt_path, map_location="cpu", weights_only=True)
    except Exception as e:  # weights_only refuses pickled objects: never unpickle an untrusted file
        raise ValueError(f"{ckpt_path}: not a loadable weights-only Lightning checkpoint ({e})") from None
    if "state_dict" not in checkpoint:
        raise ValueError(f"{ckpt_path}: no 'state_dict' (expected a Lightning checkpoint)")
    module.configure_model()
    missing, unexpected = module.load_state_dict(checkpoint["state_dict"], strict=False)
    missing = [k for k in missing if module.keep_in_checkpoint(k)] if hasattr(module, "keep_in_checkpoint") else missing
    if missing or unexpected:
        raise ValueError(f"{ckpt_path}: does not match the configured model: missing {missing[:8]}, "
                         f"unexpected {unexpected[:8]}")


class SpecTrainer(Trainer):
    def export(
        self,
        model: LightningModule,
        datamodule: LightningDataModule | None = None,
        ckpt_path: str | None = None,
        out_dir: str = "exports/draft",
        layout: str | None = None,
        weights_only: bool | None = None,
    ) -> Path:
        """Export a trained draft to a serving layout (SGLang/vLLM; Medusa also the original FasterDecoding one).

        Args:
            model: the module as configured for training (same config as ``fit``).
            datamodule: unused; accepted so the training config can be passed unchanged.
            ckpt_path: Lightning checkpoint written by ``fit``.
            out_dir: directory to write (replaced atomically).
            layout: serving layout; ``None`` picks the algorithm's default.
            weights_only: ignored (the checkpoint is always read with ``weights_only=True``); accepted so the
                ``config.yaml`` saved by ``fit`` can be passed unchanged.
        """
        if ckpt_path is None:
            raise ValueError("export needs --ckpt_path (a checkpoint written by `cli.py fit`)")
        load_draft_weights(model, ckpt_path)
        kwargs = {} if layout is None else {"layout": layout}
        out = model.export_draft(out_dir, **kwargs)
        print(f"exported draft to {out}")
        return out
