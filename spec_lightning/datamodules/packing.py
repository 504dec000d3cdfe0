"""Packing short conversations into fixed-length rows, with document boundaries kept.

Chat samples are short and uneven (``chitchat-smollm2`` averages well under half of the 256-token window), so a
right-padded batch spends much of its compute on padding. Packing puts whole conversations one after another into
rows of ``length`` tokens (greedy first fit over a seeded order; a conversation is never split) and marks each
token's document: ``position_ids`` restart at 0 in every document (the target's attention is then confined to the
document: transformers detects packed rows from restarting positions when no attention mask is given), and
``document_ids`` let the draft's TTT attention and every loss keep to one document. A packed batch gives the same
per-document losses as the unpacked one (``tests/test_packing.py``). The tail of a row is padding: its own document
(positions restart), never trainable.
"""

from __future__ import annotations

import torch
from torch.utils.data import Dataset


def pack_rows(lengths: list[int], length: int, seed: int = 0) -> list[list[int]]:
    """Indices of the samples in each packed row: greedy first fit, samples taken in a seeded random order.

    A sample longer than ``length`` gets a row of its own (it was truncated to the data's max length already).
    """
    order = torch.randperm(len(lengths), generator=torch.Generator().manual_seed(seed)).tolist()
    rows: list[list[int]] = []
    room: list[int] = []
    for i in order:
        n = lengths[i]
        for r, free in enumerate(room):
            if n <= free:
                rows[r].append(i)
                room[r] -= n
                break
        else:
            rows.append([i])
            room.append(max(length - n, 0))
    return rows


class PackedDataset(Dataset):
    """Rows of whole tokenised samples (``input_ids``/``loss_mask``) packed into ``length`` tokens each."""

    def __init__(self, samples, length: int, seed: int = 0) -> None:
        self.samples = samples
        lengths = [len(ids) for ids in samples["input_ids"]]
        self.rows = pack_rows(lengths, length, seed)
        self.length = length

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> dict[str, list[list[int]]]:
        docs = [self.samples[i] for i in self.rows[index]]
        return {"input_ids": [d["input_ids"] for d in docs], "loss_mask": [d["loss_mask"] for d in docs]}


def collate_packed(rows: list[dict], pad_id: int, length: int) -> dict[str, torch.Tensor]:
    """``[B, length]`` tensors: ``input_ids``, ``loss_mask``, ``position_ids`` (restarting per document) and
    ``document_ids`` (0, 1, ... per row; the padding tail is one more document); ``real_tokens`` ``[B]`` counts the
    non-padding tokens of each row. No ``attention_mask``."""
    B = len(rows)
    input_ids = torch.full((B, length), pad_id, dtype=torch.long)
    loss_mask = torch.zeros(B, length, dtype=torch.long)
    position_ids = torch.zeros(B, length, dtype=torch.long)
    document_ids = torch.zeros(B, length, dtype=torch.long)
    real_tokens = torch.zeros(B, dtype=torch.long)
    for b, row in enumerate(rows):
        start = 0
        for d, (ids, mask) in enumerate(zip(row["input_ids"], row["loss_mask"], strict=True)):
            n = min(len(ids), length - start)
            input_ids[b, start:start + n] = torch.as_tensor(ids[:n])
            loss_mask[b, start:start + n] = torch.as_tensor(mask[:n])
            position_ids[b, start:start + n] = torch.arange(n)
            document_ids[b, start:start + n] = d
            start += n
        real_tokens[b] = start
        if start < length:  # padding: a document of its own, positions restarting, never trainable
            position_ids[b, start:] = torch.arange(length - start)
            document_ids[b, start:] = len(row["input_ids"])
    return {"input_ids": input_ids, "loss_mask": loss_mask, "position_ids": position_ids,
            "document_ids": document_ids, "real_tokens": real_tokens}
