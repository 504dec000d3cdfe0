"""Read chat conversations from files, `datasets` directories or builtin sets into one shape.

Every conversation becomes ``{"id": str, "origin": "file:line", "messages": [{"role", "content"}]}`` with roles
in ``system`` / ``user`` / ``assistant``. Two record shapes are understood:

* OpenAI: ``{"messages": [{"role": ..., "content": ...}]}``
* ShareGPT: ``{"conversations": [{"from": ..., "value": ...}]}``

Problems with single samples (malformed JSON line, unknown role, no assistant turn, ...) are collected as
:class:`BadSample` records naming the file and line; the caller decides whether to skip or raise.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

ROLE_ALIASES = {
    "system": "system",
    "user": "user",
    "human": "user",
    "assistant": "assistant",
    "gpt": "assistant",
    "chatgpt": "assistant",
    "bot": "assistant",
    "model": "assistant",
}

PACKAGE_DATA = Path(__file__).resolve().parents[1] / "data"
# Held-out evaluation prompts shipped with the package (32 chitchat openers no recipe trains on; 40 hand-written
# instruction-style prompts).
HELDOUT = {"heldout-chitchat": PACKAGE_DATA / "heldout_chitchat.jsonl",
           "heldout-instructions": PACKAGE_DATA / "heldout_instructions.jsonl"}
BUILTIN_DATASETS = ("chitchat", "chitchat-smollm2", "magpie-smollm2", "heldout-chitchat", "heldout-instructions")
# Builtins that are files elsewhere (generated on first use, or packaged): datamodules.catalog.resolve_source turns
# their names into paths before anything here reads them.
RESOLVED_BUILTINS = ("chitchat-smollm2", "magpie-smollm2", "heldout-chitchat", "heldout-instructions")


class DataError(ValueError):
    """A data source that cannot be read at all (missing, empty, wrong format)."""


@dataclass
class BadSample:
    origin: str  # "path:line" or "path#index"
    reason: str

    def __str__(self) -> str:
        return f"{self.origin}: {self.reason}"


@dataclass
class ReadResult:
    conversations: list[dict] = field(default_factory=list)
    bad: list[BadSample] = field(default_factory=list)


def normalise_record(record: object, origin: str, require_assistant: bool = True) -> dict:
    """Turn one raw record into ``{"id", "origin", "messages"}``; raise ``ValueError`` saying what is wrong."""
    if not isinstance(record, dict):
        raise ValueError(f"expected a JSON object with 'messages' or 'conversations', got {type(record).__name__}")
    if "messages" in record:
        turns, role_key, text_key = record["messages"], "role", "content"
    elif "conversations" in record:
        turns, role_key, text_key = record["conversations"], "from", "value"
    else:
        raise ValueError(f"expected a 'messages' (OpenAI) or 'conversations' (ShareGPT) field, got keys {sorted(record)}")
    if not isinstance(turns, list) or not turns:
        raise ValueError("expected a non-empty list of turns")
    messages = []
    for i, turn in enumerate(turns):
        if not isinstance(turn, dict) or role_key not in turn or text_key not in turn:
            raise ValueError(f"turn {i}: expected an object with '{role_key}' and '{text_key}'")
        raw_role = str(turn[role_key]).strip().lower()
        role = ROLE_ALIASES.get(raw_role)
        if role is None:
            raise ValueError(f"turn {i}: unknown role {turn[role_key]!r} (expected one of {sorted(ROLE_ALIASES)})")
        content = turn[text_key]
        if not isinstance(content, str):
            raise ValueError(f"turn {i}: expected '{text_key}' to be a string, got {type(content).__name__}")
        messages.append({"role": role, "content": content})
    if require_assistant and not any(m["role"] == "assistant" for m in messages):
        raise ValueError("conversation has no assistant turn (nothing to train on)")
    sample_id = record.get("id", record.get("sample_id", origin))
    return {"id": str(sample_id), "origin": origin, "messages": messages}


def _records_from_file(path: Path) -> Iterator[tuple[str, object | Exception]]:
    """Yield ``(origin, record or the parse error)`` for every record of a JSON / JSONL / parquet file."""
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        with path.open("rb") as f:  # decoded line by line: one bad line is one bad sample, not a failed file
            for lineno, raw in enumerate(f, 1):
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError as e:
                    yield f"{path}:{lineno}", ValueError(f"not valid UTF-8 (byte 0x{raw[e.start]:02x} at column "
                                                         f"{e.start + 1})")
                    continue
                if not line.strip():
                    continue
                try:
                    yield f"{path}:{lineno}", json.loads(line)
                except json.JSONDecodeError as e:
                    yield f"{path}:{lineno}", ValueError(f"malformed JSON line ({e.msg} at column {e.colno})")
    elif suffix == ".json":
        raw = path.read_bytes()
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            line = raw[: e.start].count(b"\n") + 1
            raise DataError(f"{path}:{line}: not valid UTF-8 (byte 0x{raw[e.start]:02x}); expected a UTF-8 JSON "
                            "file") from None
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{e.lineno}: invalid JSON ({e.msg}); expected a list of conversations") from None
        if isinstance(data, dict):  # {id: record} mapping
            data = [{"id": k, **v} if isinstance(v, dict) else v for k, v in data.items()]
        if not isinstance(data, list):
            raise DataError(f"{path}: expected a JSON list of conversations, got {type(data).__name__}")
        for i, rec in enumerate(data):
            yield f"{path}#{i}", rec
    elif suffix == ".parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        try:
            rows = pq.read_table(path).to_pylist()
        except (pa.ArrowException, OSError) as e:
            raise DataError(f"{path}: not a readable parquet file ({str(e).splitlines()[0][:160]})") from None
        for i, rec in enumerate(rows):
            yield f"{path}#{i}", rec
    else:
        raise DataError(f"{path}: unsupported file type {suffix!r} (expected .json, .jsonl or .parquet)")


def _records_from_dataset_dir(path: Path) -> Iterator[tuple[str, object]]:
    import datasets

    try:
        ds = datasets.load_from_disk(str(path))
    except Exception as e:  # datasets raises FileNotFoundError, pyarrow errors, ... for a wrong or broken directory
        raise DataError(f"{path}: not a readable `datasets` directory ({str(e).splitlines()[0][:160]}); expected "
                        "save_to_disk output or a .json/.jsonl/.parquet file") from None
    if isinstance(ds, datasets.DatasetDict):
        if "train" not in ds:
            raise DataError(f"{path}: DatasetDict without a 'train' split (has {list(ds)})")
        ds = ds["train"]
    for i, rec in enumerate(ds):
        yield f"{path}#{i}", rec


def chitchat_path() -> Path:
    import importlib.util

    spec = importlib.util.find_spec("chitchat_dataset")
    if spec is None or spec.origin is None:
        raise DataError("builtin dataset 'chitchat' needs the PyPI package: pip install chitchat-dataset==0.9.0")
    return Path(spec.origin).parent / "dataset.json"


def _records_from_chitchat() -> Iterator[tuple[str, object]]:
    """SPEC §6: each inner list is one turn of one speaker; alternate turns map to user/assistant."""
    path = chitchat_path()
    data = json.loads(path.read_text(encoding="utf-8"))
    for conv_id, conv in data.items():
        turns = conv.get("messages", [])
        messages = [
            {"role": "user" if i % 2 == 0 else "assistant", "content": "\n".join(m["text"] for m in turn)}
            for i, turn in enumerate(turns)
        ]
        yield f"chitchat#{conv_id}", {"id": conv_id, "messages": messages}


def _not_resolved(source: str) -> None:
    if source in RESOLVED_BUILTINS:
        raise DataError(f"builtin set {source!r} is a file elsewhere (generated on first use, or packaged): resolve "
                        "it with spec_lightning.datamodules.catalog.resolve_source before reading it")


def source_files(source: str) -> list[Path]:
    """Files a source reads (for fingerprints); builtins resolve to their package file."""
    _not_resolved(source)
    if source in BUILTIN_DATASETS:
        return [chitchat_path()]
    path = Path(source).expanduser()
    if path.is_dir():
        return sorted(p for p in path.rglob("*") if p.is_file())
    return [path]


def source_fingerprint(source: str) -> str:
    """Identity of a source's content: the name and the sha256 of every file it reads (not size/mtime)."""
    from spec_lightning.integrity import sha256_file

    h = hashlib.sha256(source.encode())
    for p in source_files(source):
        h.update(f"{p.name}|{sha256_file(p)}".encode())
    return h.hexdigest()[:16]


def read_conversations(source: str, require_assistant: bool = True) -> ReadResult:
    """Read every conversation of ``source``; per-sample problems go to ``result.bad``.

    Raises:
        FileNotFoundError: the file or directory does not exist.
        DataError: the source is empty or not readable as a whole.
    """
    _not_resolved(source)
    if source in BUILTIN_DATASETS:
        records: Iterator = _records_from_chitchat()
        name = source
    else:
        path = Path(source).expanduser()
        name = str(path)
        if not path.exists():
            raise FileNotFoundError(f"data source not found: {path} (expected a .json/.jsonl/.parquet file, a "
                                    f"datasets directory, or a builtin name: {', '.join(BUILTIN_DATASETS)})")
        if path.is_file() and os.path.getsize(path) == 0:
            raise DataError(f"{path}: file is empty (expected conversations)")
        records = _records_from_dataset_dir(path) if path.is_dir() else _records_from_file(path)
    result = ReadResult()
    for origin, rec in records:
        if isinstance(rec, Exception):
            result.bad.append(BadSample(origin, str(rec)))
            continue
        try:
            result.conversations.append(normalise_record(rec, origin, require_assistant=require_assistant))
        except ValueError as e:
            result.bad.append(BadSample(origin, str(e)))
    if not result.conversations and not result.bad:
        raise DataError(f"{name}: no conversations found (expected at least one record)")
    return result
