"""Model classes that were split or renamed: old checkpoints map to the class that now reads them, and an old config
fails with one line naming the class to use.

``MedusaModule`` (one class, ``mode: medusa1 | medusa2``) became ``Medusa1Module`` and ``Medusa2Module``: the same
settings minus ``mode``, the same checkpoint contents, so its checkpoints load into the new classes unchanged.
"""

from __future__ import annotations

from typing import Any

MEDUSA_MODULE = "spec_lightning.modules.medusa.MedusaModule"
MEDUSA_SPLIT = {"medusa1": "spec_lightning.modules.medusa1.Medusa1Module",
                "medusa2": "spec_lightning.modules.medusa2.Medusa2Module"}
MEDUSA2_ONLY = ("medusa2_lambda", "head_lr_multiplier", "base_training", "lora_r", "lora_alpha", "lora_dropout",
                "lora_target_modules", "self_distill")


def current_class_path(class_path: str | None, settings: dict[str, Any]) -> str | None:
    """The class that now implements ``class_path`` configured with ``settings`` (``class_path`` itself when nothing
    was renamed); e.g. ``MedusaModule`` with ``mode: medusa2`` -> ``Medusa2Module``."""
    if class_path != MEDUSA_MODULE:
        return class_path
    return MEDUSA_SPLIT.get(settings.get("mode", "medusa1"), class_path)


def renamed_class_message(class_path: str | None, settings: dict[str, Any]) -> str | None:
    """One line saying which class replaces ``class_path`` (``None`` if it was not renamed)."""
    if class_path != MEDUSA_MODULE:
        return None
    mode = settings.get("mode", "medusa1")
    if mode in MEDUSA_SPLIT:
        drop = "`mode`" if mode == "medusa2" else f"`mode` and the Medusa-2 settings ({', '.join(MEDUSA2_ONLY)})"
        return (f"{MEDUSA_MODULE} with mode: {mode} is now {MEDUSA_SPLIT[mode]}: set the model's class_path to it and "
                f"remove {drop}; its checkpoints load unchanged")
    return (f"{MEDUSA_MODULE} was split into {MEDUSA_SPLIT['medusa1']} (heads on a frozen target) and "
            f"{MEDUSA_SPLIT['medusa2']} (heads and base trained jointly); got mode {mode!r}")
