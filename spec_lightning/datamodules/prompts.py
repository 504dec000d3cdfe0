"""Held-out prompts for acceptance measurements: conversations cut before their first assistant turn.

Prompts are rendered with the target's chat template and generation prompt (:func:`~spec_lightning.datamodules.chat.
prompt_ids`), from tokenised rows of a DataModule's validation split or from any conversation file.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Iterable, Sequence

from spec_lightning.datamodules.catalog import resolve_source
from spec_lightning.datamodules.chat import prompt_ids
from spec_lightning.datamodules.sources import read_conversations

log = logging.getLogger(__name__)


def prompt_from_tokenized(input_ids: Sequence[int], loss_mask: Sequence[int]) -> list[int] | None:
    """The tokens before the first trainable (assistant) token: the first user turn(s) with the generation prompt.

    ``None`` when the row has no assistant token or nothing before it.
    """
    for i, m in enumerate(loss_mask):
        if m:
            return list(input_ids[:i]) if i > 0 else None
    return None


def _prompt_head(messages: Sequence[dict]) -> list[dict]:
    """The turns before the first assistant turn."""
    head = []
    for m in messages:
        if m["role"] == "assistant":
            break
        head.append({"role": m["role"], "content": m["content"]})
    return head


def prompt_problem(messages: Sequence[dict]) -> str | None:
    """Why a conversation gives no prompt (``None``: it gives one): no user turn before the first assistant turn, or
    user turns that hold no text (an empty prompt would be decoded and counted in τ and tokens/s)."""
    users = [m for m in _prompt_head(messages) if m["role"] == "user"]
    if not users:
        return "no user turn before the first assistant turn"
    if not any(m["content"].strip() for m in users):
        return "empty prompt (the user turn holds no text)"
    return None


def prompt_from_messages(tokenizer, messages: Sequence[dict]) -> list[int] | None:
    """The conversation cut before its first assistant turn, rendered with the generation prompt (``None`` when
    :func:`prompt_problem` finds none)."""
    if prompt_problem(messages) is not None:
        return None
    return prompt_ids(tokenizer, _prompt_head(messages))


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
    tokenizer's chat template and generation prompt. Conversations that give no prompt (unreadable, no or an empty
    user turn, longer than ``max_prompt_tokens``) are skipped and counted in one warning, as bad training rows are.
    """
    read = read_conversations(resolve_source(path), require_assistant=False)
    out: list[list[int]] = []
    skipped: Counter[str] = Counter({"unreadable": len(read.bad)} if read.bad else {})
    examples = [str(b) for b in read.bad[:3]]
    for conversation in read.conversations:
        if limit is not None and len(out) >= limit:
            break
        reason = prompt_problem(conversation["messages"])
        prompt = None if reason else prompt_ids(tokenizer, _prompt_head(conversation["messages"]))
        if prompt is not None and max_prompt_tokens is not None and len(prompt) > max_prompt_tokens:
            reason = f"longer than max_prompt_tokens={max_prompt_tokens}"
        if reason:
            skipped[reason] += 1
            examples.append(f"{conversation['origin']}: {reason}")
            continue
        out.append(prompt)
    if not out:
        raise ValueError(f"{path}: no usable prompt (skipped: {dict(skipped)}; e.g. {examples[:3]})")
    if skipped:
        log.warning("%s: %d prompts kept, %d skipped %s (e.g. %s)", path, len(out), sum(skipped.values()),
                    dict(skipped), examples[0])
    return out
