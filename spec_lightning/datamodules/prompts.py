"""Held-out prompts for acceptance measurements: conversations cut before their first assistant turn.

Prompts are rendered with the target's chat template and generation prompt (:func:`~spec_lightning.datamodules.chat.
prompt_ids`), from tokenised rows of a DataModule's validation split or from any conversation file.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from spec_lightning.datamodules.catalog import resolve_source
from spec_lightning.datamodules.chat import prompt_ids
from spec_lightning.datamodules.sources import read_conversations


def prompt_from_tokenized(input_ids: Sequence[int], loss_mask: Sequence[int]) -> list[int] | None:
    """The tokens before the first trainable (assistant) token: the first user turn(s) with the generation prompt.

    ``None`` when the row has no assistant token or nothing before it.
    """
    for i, m in enumerate(loss_mask):
        if m:
            return list(input_ids[:i]) if i > 0 else None
    return None


def prompt_from_messages(tokenizer, messages: Sequence[dict]) -> list[int] | None:
    """The conversation cut before its first assistant turn, rendered with the generation prompt."""
    head = []
    for m in messages:
        if m["role"] == "assistant":
            break
        head.append({"role": m["role"], "content": m["content"]})
    if not any(m["role"] == "user" for m in head):
        return None
    return prompt_ids(tokenizer, head)


def prompts_from_dataset(rows: Iterable[dict], limit: int | None = None, max_prompt_tokens: int | None = None) -> list[list[int]]:
    """Prompts from tokenised rows (``input_ids``/``loss_mask``, e.g. a ChatDataModule's ``val_dataset``)."""
    out: list[list[int]] = []
    for row in rows:
        if limit is not None and len(out) >= limit:
            break
        prompt = prompt_from_tokenized(row["input_ids"], row["loss_mask"])
        if prompt and (max_prompt_tokens is None or len(prompt) <= max_prompt_tokens):
            out.append(prompt)
    return out


def prompts_from_file(path: str, tokenizer, limit: int | None = None,
                      max_prompt_tokens: int | None = None) -> list[list[int]]:
    """Prompts from a conversation file (JSON/JSONL/parquet/datasets dir; OpenAI or ShareGPT records).

    Each conversation is cut before its first assistant turn (conversations may have none) and rendered with the
    tokenizer's chat template and generation prompt.
    """
    read = read_conversations(resolve_source(path), require_assistant=False)
    out: list[list[int]] = []
    for conversation in read.conversations:
        if limit is not None and len(out) >= limit:
            break
        prompt = prompt_from_messages(tokenizer, conversation["messages"])
        if prompt and (max_prompt_tokens is None or len(prompt) <= max_prompt_tokens):
            out.append(prompt)
    if not out:
        bad = f" ({len(read.bad)} unreadable, first: {read.bad[0]})" if read.bad else ""
        raise ValueError(f"{path}: no conversation with a user turn before the first assistant turn{bad}")
    return out
