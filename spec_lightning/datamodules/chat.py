"""Conversations -> ``input_ids`` + ``loss_mask`` with the tokenizer's own chat template.

Assistant spans are found by *prefix rendering*, so any template works without hard-coding its format:
for assistant message i, the text before it is the rendering of ``messages[:i]`` with the generation prompt,
and the text through its end is the rendering of ``messages[:i + 1]``. The characters in between, minus
trailing whitespace after the end-of-turn marker, are the assistant span (content + end-of-turn token).
A token is trainable iff its character span overlaps an assistant span.
"""

from __future__ import annotations

from dataclasses import dataclass


class TemplateError(ValueError):
    """The chat template renders a conversation in a way prefix rendering cannot split."""


@dataclass
class TokenizedChat:
    input_ids: list[int]
    loss_mask: list[int]


def _render(tokenizer, messages: list[dict], add_generation_prompt: bool) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)


def assistant_char_spans(tokenizer, messages: list[dict]) -> tuple[str, list[tuple[int, int]]]:
    """Render ``messages`` and return ``(text, [(start, end), ...])`` of the assistant spans in it."""
    full = _render(tokenizer, messages, add_generation_prompt=False)
    spans: list[tuple[int, int]] = []
    cursor = 0
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        through = _render(tokenizer, messages[: i + 1], add_generation_prompt=False)
        if i == 0:
            # An opening assistant turn has no prompt to render before it, but the template may still inject a
            # system prompt and a role header there: only the content (and what follows it) is the span.
            start = through.rfind(message["content"]) if message["content"] else len(through.rstrip())
            if start < 0 or not full.startswith(through):
                raise TemplateError("opening assistant turn not found in the rendered conversation")
            end = len(through.rstrip())
            if end > start:
                spans.append((start, end))
            cursor = end
            continue
        before = _render(tokenizer, messages[:i], add_generation_prompt=True)
        if through.startswith(before) and full.startswith(through):
            start, end = len(before), len(through.rstrip())
        else:
            # Templates that rewrite earlier turns (e.g. drop reasoning from history): locate the content.
            start = full.find(message["content"], cursor)
            if start < 0:
                raise TemplateError(f"assistant turn {i} not found in the rendered conversation")
            end = start + len(message["content"])
        # The span starts where the generation prompt ends; leading whitespace the template puts before the
        # content belongs to the first generated token, so it stays in the span.
        if end > start:
            spans.append((start, end))
        cursor = end
    return full, spans


def tokenize_conversation(tokenizer, messages: list[dict]) -> TokenizedChat:
    """Token ids of the rendered conversation and a 0/1 mask that is 1 exactly on assistant-span tokens."""
    text, spans = assistant_char_spans(tokenizer, messages)
    # The template is the source of truth for BOS and other scaffolding: add no special tokens.
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = enc["input_ids"], enc["offset_mapping"]
    mask = [0] * len(ids)
    j = 0
    for t, (a, b) in enumerate(offsets):
        while j < len(spans) and spans[j][1] <= a:
            j += 1
        if j < len(spans) and b > a and a < spans[j][1] and b > spans[j][0]:
            mask[t] = 1
    return TokenizedChat(input_ids=list(ids), loss_mask=mask)


def prompt_ids(tokenizer, messages: list[dict]) -> list[int]:
    """Token ids of ``messages`` rendered with the template's generation prompt (what the model answers next).

    Tokenised like :func:`tokenize_conversation` (the template is the source of truth for BOS and other scaffolding,
    so no special tokens are added): the one prompt tokenisation of evaluation, regeneration and serving checks.
    """
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return [int(i) for i in tokenizer(text, add_special_tokens=False)["input_ids"]]
