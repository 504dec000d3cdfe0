"""Data source names -> files: the builtin sets by name, anything else as given.

The one place the data side reaches into ``datagen``: a generated builtin set (``chitchat-smollm2``, ``magpie-*``)
is built by the target on first use (``datagen.builtins``), so resolving its name may run the generation. Everything
else here only reads.
"""

from __future__ import annotations

import hashlib

from spec_lightning.datamodules.sources import HELDOUT, ReadResult, read_conversations, source_fingerprint


def resolve_source(source: str) -> str:
    """The path to read for ``source``: a builtin generated set's cached file (built on first use), a held-out
    prompt set's packaged file, else ``source`` itself (a file, a ``datasets`` directory or the human ``chitchat``)."""
    # imported here: datagen reads conversations through this package, whose __init__ imports the DataModule
    from spec_lightning.datagen.builtins import builtin_path

    generated = builtin_path(source)
    if generated is not None:
        return str(generated)
    if source in HELDOUT:
        return str(HELDOUT[source])
    return source


def read_sources(data: str | list[str], require_assistant: bool = True) -> ReadResult:
    """Every conversation of one source or of several (a mix, in the order given), builtins resolved."""
    merged = ReadResult()
    for source in [data] if isinstance(data, str) else list(data):
        read = read_conversations(resolve_source(source), require_assistant=require_assistant)
        merged.conversations += read.conversations
        merged.bad += read.bad
    return merged


def sources_fingerprint(data: str | list[str]) -> str:
    """Content identity of one source or of a mix (order included)."""
    if isinstance(data, str):
        return source_fingerprint(resolve_source(data))
    return hashlib.sha256("|".join(sources_fingerprint(d) for d in data).encode()).hexdigest()[:16]
