"""``python cli.py show-data``: print tokenised samples with the trainable (loss-mask) tokens highlighted.

Checks what a chat template and the loss mask make of your data before a long run: every token is printed as its
text, trainable tokens inside ``[[...]]`` (or in green with ``--color``), with counts per sample.

    python cli.py show-data --target smollm2-135m-instruct --data chitchat --num 2
    python cli.py show-data --target path/to/model --data my_chats.jsonl --max_length 1024 --color true
"""

from __future__ import annotations

from spec_lightning.datamodules.catalog import resolve_source
from spec_lightning.datamodules.chat import tokenize_conversation
from spec_lightning.datamodules.sources import read_conversations

GREEN, RESET = "\033[32m", "\033[0m"


def render_mask(tokenizer, input_ids: list[int], loss_mask: list[int], color: bool = False) -> str:
    """The decoded sample with each run of trainable tokens marked (``[[...]]`` or green)."""
    pieces, run = [], []
    open_, close = (GREEN, RESET) if color else ("[[", "]]")
    for token, trainable in zip(input_ids, loss_mask, strict=True):
        text = tokenizer.decode([token])
        if trainable:
            run.append(text)
            continue
        if run:
            pieces.append(open_ + "".join(run) + close)
            run = []
        pieces.append(text)
    if run:
        pieces.append(open_ + "".join(run) + close)
    return "".join(pieces)


def show(target: str = "smollm2-135m-instruct", data: str = "chitchat", num: int = 2, start: int = 0,
         max_length: int = 512, color: bool = False) -> list[str]:
    """Print ``num`` samples of ``data`` from index ``start``, tokenised with ``target``'s tokenizer and template.

    Args:
        target: target source whose tokenizer and chat template are used (as in training).
        data: builtin name, .json/.jsonl/.parquet file or ``datasets`` directory.
        num: samples to show.
        start: index of the first sample.
        max_length: truncate as training would.
        color: green for trainable tokens instead of ``[[...]]``.
    """
    from spec_lightning.targets import load_tokenizer

    tokenizer = load_tokenizer(target)
    read = read_conversations(resolve_source(data))
    shown = []
    for conversation in read.conversations[start:start + num]:
        tok = tokenize_conversation(tokenizer, conversation["messages"])
        ids, mask = tok.input_ids[:max_length], tok.loss_mask[:max_length]
        text = render_mask(tokenizer, ids, mask, color)
        header = (f"--- {conversation['origin']}: {len(ids)} tokens, {sum(mask)} trainable"
                  + (f" (truncated from {len(tok.input_ids)})" if len(tok.input_ids) > max_length else ""))
        print(header)
        print(text)
        shown.append(text)
    if read.bad:
        print(f"--- {len(read.bad)} unreadable samples in {data}, e.g. {read.bad[0]}")
    return shown


def main(args: list[str] | None = None) -> list[str]:
    from jsonargparse import ArgumentParser

    parser = ArgumentParser(prog="cli.py show-data", description=__doc__.split("\n\n")[0])
    parser.add_function_arguments(show)
    cfg = parser.parse_args(args)
    return show(**{k: v for k, v in cfg.items() if k != "__path__"})
