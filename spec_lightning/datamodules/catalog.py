"""Data source names -> files: the builtin sets by name, anything else as given.

The one place the data side reaches into ``datagen``: a generated builtin set (``chitchat-smollm2``, ``magpie-*``)
is built by the target on first use (``datagen.builtins``), so resolving its name may run the generation. Everything
else here only reads.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

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


def resolve_sources(data: str | list[str]) -> list[str]:
    """``resolve_source`` of one source or of each of a mix; the generated builtins among them that need building
    share one engine per target (vLLM starts once for a recipe's whole mix)."""
    from spec_lightning.datagen.builtins import shared_engines

    with shared_engines():
        return [resolve_source(source) for source in ([data] if isinstance(data, str) else list(data))]


def read_sources(data: str | list[str], require_assistant: bool = True) -> ReadResult:
    """Every conversation of one source or of several (a mix, in the order given), builtins resolved."""
    merged = ReadResult()
    for path in resolve_sources(data):
        read = read_conversations(path, require_assistant=require_assistant)
        merged.conversations += read.conversations
        merged.bad += read.bad
    return merged


def sources_fingerprint(data: str | list[str]) -> str:
    """Content identity of one source or of a mix (order included)."""
    paths = resolve_sources(data)
    if isinstance(data, str):
        return source_fingerprint(paths[0])
    return hashlib.sha256("|".join(source_fingerprint(p) for p in paths).encode()).hexdigest()[:16]


def distilled_by(source: str) -> str | None:
    """The target that wrote ``source``'s answers (a generated builtin set, or a ``regenerate`` / ``synthesize``
    JSONL whose first record's provenance names it), found without building anything; ``None`` for other data."""
    from spec_lightning.datagen.builtins import builtin_target

    named = builtin_target(source)
    if named is not None:
        return named
    path = Path(source).expanduser()
    if path.suffix != ".jsonl" or not path.is_file():
        return None
    with path.open(encoding="utf-8") as f:
        first = next((line for line in f if line.strip()), "")
    try:
        provenance = json.loads(first).get("provenance") if first else None
    except (json.JSONDecodeError, AttributeError):
        return None
    return provenance.get("target") if isinstance(provenance, dict) else None


def same_target(a: str, b: str) -> bool:
    """Whether two target sources name the same model: equal, the same directory, or the same model name (a hub id's
    or a directory's last part, case-insensitive: ``HuggingFaceTB/SmolLM2-135M-Instruct`` = ``smollm2-135m-instruct``)."""
    if a == b:
        return True
    pa, pb = Path(a).expanduser(), Path(b).expanduser()
    if pa.exists() and pb.exists() and pa.resolve() == pb.resolve():
        return True
    return pa.name.lower().removesuffix(".gguf") == pb.name.lower().removesuffix(".gguf")


def check_distilled_for(data: str | list[str], target: str, allow_other_target: bool = False) -> None:
    """Refuse self-distilled data written by another target than ``target`` (a draft learns what *its* target
    says), in one line that says how to regenerate it; ``allow_other_target`` lets it through."""
    for source in [data] if isinstance(data, str) else list(data):
        writer = distilled_by(source)
        if writer is None or allow_other_target or same_target(writer, target):
            continue
        raise ValueError(f"data {source!r} holds the answers of target {writer!r}, not of {target!r}, the target this "
                         f"draft is for: regenerate it for your target (python cli.py regenerate --target {target} "
                         "--data <your prompts> --out data.jsonl, or python cli.py synthesize --target "
                         f"{target} --out data.jsonl) and train on that, or set "
                         "--data.init_args.allow_other_target true to train on another target's answers on purpose")
