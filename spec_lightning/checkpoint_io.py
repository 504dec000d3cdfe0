"""Writing Lightning checkpoints: a save that cannot fit on the disk is refused before a byte is written.

A checkpoint's size is known before it is written (the tensors of the state dict, optimizer states included): when
the file system has less free space, the run stops with one line naming the directory, the bytes needed and the
bytes free (:func:`~spec_lightning.atomic.ensure_free_space`) instead of a half-written file and a deep traceback;
the previous checkpoints stay as they were.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from lightning.fabric.plugins import TorchCheckpointIO

from spec_lightning.atomic import ensure_free_space


def checkpoint_bytes(obj: Any) -> int:
    """Bytes of tensor data ``torch.save`` writes for ``obj`` (each storage once; nested dicts, lists, tuples)."""
    storages: dict[tuple[int, int], int] = {}
    stack = [obj]
    while stack:
        item = stack.pop()
        if isinstance(item, torch.Tensor):
            storage = item.untyped_storage()
            storages[(storage.data_ptr(), storage.nbytes())] = storage.nbytes()
        elif isinstance(item, dict):
            stack.extend(item.values())
        elif isinstance(item, (list, tuple)):
            stack.extend(item)
    return sum(storages.values())


class SpaceCheckedCheckpointIO(TorchCheckpointIO):
    """Lightning's ``TorchCheckpointIO`` that checks the free space before each save (local paths)."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        if "://" not in str(path):
            ensure_free_space(Path(path).parent, checkpoint_bytes(checkpoint), f"checkpoint {path}")
        super().save_checkpoint(checkpoint, path, storage_options=storage_options)
