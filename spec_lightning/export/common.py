"""Helpers every exporter uses: atomic directory writes and JSON config files."""

from __future__ import annotations

import json
from pathlib import Path

from spec_lightning.atomic import atomic_directory

__all__ = ["atomic_directory", "read_json", "write_json"]


def write_json(path: str | Path, obj: dict) -> None:
    Path(path).write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")


def read_json(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: invalid JSON at line {e.lineno}: {e.msg}") from None
