"""Data: conversations -> token batches (online) for the draft-training modules."""

from spec_lightning.datamodules.chat_datamodule import ChatDataModule, collate_chat

__all__ = ["ChatDataModule", "collate_chat"]
