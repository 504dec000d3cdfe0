"""Data: conversations -> token batches (online) for the draft-training modules."""

from spec_lightning.datamodules.chat_datamodule import ChatDataModule, collate_chat
from spec_lightning.datamodules.feature_cache import FeatureCacheDataModule

__all__ = ["ChatDataModule", "FeatureCacheDataModule", "collate_chat"]
