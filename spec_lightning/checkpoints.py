"""Reading Lightning checkpoints safely: weights only, one-line errors, and agreement with the configured model.

* Every checkpoint is read with ``torch.load(..., weights_only=True)``: a checkpoint is data, never code.
* Remote (``http(s)://``) checkpoints are refused before anything is downloaded: Lightning's default unpickles
  them (``weights_only=False`` for URLs), and their settings could not be checked against the config first.
* The hyper-parameters saved in a checkpoint must agree with the configured model: LightningCLI would silently
  replace the config's (and the command line's) model settings with the checkpoint's; here every differing field is
  named and the command fails.
"""

from __future__ import annotations

import json
import pickle
from pathlib import Path
from typing import Any

import torch
from torch import nn

from spec_lightning.modules.renamed import current_class_path

REMOTE_PREFIXES = ("http://", "https://")
LIGHTNING_CKPT_NAMES = ("last", "best", "hpc", "registry")  # --ckpt_path values Lightning resolves itself


def read_checkpoint(ckpt_path: str | Path) -> dict[str, Any]:
    """The checkpoint dict of a local Lightning checkpoint, read with ``weights_only=True``."""
    text = str(ckpt_path)
    if text.startswith(REMOTE_PREFIXES):
        raise ValueError(f"--ckpt_path {text}: remote checkpoints are refused (they cannot be checked before loading); "
                         "download the file and pass its local path")
    path = Path(ckpt_path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, AttributeError, KeyError, OSError) as e:
        raise ValueError(f"{path}: not a Lightning checkpoint readable with weights_only=True ({_reason(e)})") from None
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint:
        raise ValueError(f"{path}: not a Lightning checkpoint (no 'state_dict')")
    return checkpoint


def _reason(error: Exception) -> str:
    """The informative part of a ``torch.load`` error (torch's weights-only message is a paragraph)."""
    text = str(error)
    if "WeightsUnpickler error:" in text:
        detail = text.split("WeightsUnpickler error:", 1)[1].strip().split("\n\n")[0].strip()
        return f"not plain tensors and data: {detail[:120]}"
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return (lines[0] if lines else type(error).__name__)[:160]


def _plain(value: Any) -> Any:
    """A JSON-comparable form (tuples -> lists, Namespaces/dicts -> dicts)."""
    if hasattr(value, "as_dict"):
        value = value.as_dict()
    try:
        return json.loads(json.dumps(value, default=str))
    except (TypeError, ValueError):
        return str(value)


def checkpoint_conflicts(hparams: dict[str, Any], model_config: dict[str, Any]) -> list[str]:
    """``"field: checkpoint X, config Y"`` for every model setting that differs between a checkpoint and a config.

    Args:
        hparams: the checkpoint's ``hyper_parameters`` (``_class_path`` and ``init_args`` fields as saved by
            LightningCLI / ``save_hyperparameters``).
        model_config: the configured model (``{"class_path": ..., "init_args": {...}}``).
    """
    conflicts = []
    init_args = model_config.get("init_args") or {}
    # a class that was split or renamed is compared as the class that now reads its checkpoints
    ckpt_class = current_class_path(hparams.get("_class_path"), hparams)
    config_class = current_class_path(model_config.get("class_path"), init_args)
    if ckpt_class and config_class and ckpt_class != config_class:
        conflicts.append(f"model class: checkpoint {ckpt_class}, config {config_class}")
        return conflicts  # the fields of two classes are not comparable
    for key in sorted(hparams):
        if key.startswith("_") or key not in init_args:
            continue
        saved, configured = _plain(hparams[key]), _plain(init_args[key])
        if saved != configured:
            conflicts.append(f"{key}: checkpoint {saved!r}, config {configured!r}")
    return conflicts


def check_checkpoint_agrees(ckpt_path: str | Path, model_config: Any) -> None:
    """Raise ``ValueError`` naming every conflict between ``ckpt_path``'s hyper-parameters and ``model_config``."""
    checkpoint = read_checkpoint(ckpt_path)
    hparams = dict(checkpoint.get("hyper_parameters") or {})
    if model_config is None or not hparams:
        return
    config = _plain(model_config)
    if not isinstance(config, dict):
        return
    conflicts = checkpoint_conflicts(hparams, config)
    if conflicts:
        raise ValueError(f"{ckpt_path}: the checkpoint and the configured model disagree on "
                         f"{'; '.join(conflicts)}. Use the config.yaml the run saved (or set these values)")


def load_draft_weights(module: nn.Module, ckpt_path: str | Path) -> None:
    """Load a draft checkpoint's weights into ``module`` (target reloaded from its source, never from the file)."""
    checkpoint = read_checkpoint(ckpt_path)
    module.configure_model()
    missing, unexpected = module.load_state_dict(checkpoint["state_dict"], strict=False)
    missing = [k for k in missing if module.keep_in_checkpoint(k)] if hasattr(module, "keep_in_checkpoint") else missing
    if missing or unexpected:
        raise ValueError(f"{ckpt_path}: does not match the configured model: missing {missing[:8]}, "
                         f"unexpected {unexpected[:8]}")
