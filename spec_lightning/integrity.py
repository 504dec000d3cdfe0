"""Content hashes for caches and inputs: a cache is trusted only if its bytes are the bytes that were written.

Size and mtime are not identity (an edit can keep both), so fingerprints of sources and verification of caches hash
the content itself (sha256 streams at about 1 GB/s).
"""

from __future__ import annotations

import hashlib
from pathlib import Path

CHUNK = 1 << 20


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with Path(path).open("rb") as f:
        while block := f.read(CHUNK):
            h.update(block)
    return h.hexdigest()


def tree_digest(root: str | Path, exclude: tuple[str, ...] = ()) -> dict[str, str]:
    """``{relative path: sha256}`` of every file under ``root`` (names in ``exclude`` skipped)."""
    root = Path(root)
    return {str(p.relative_to(root)): sha256_file(p) for p in sorted(root.rglob("*"))
            if p.is_file() and p.name not in exclude}


def tree_problems(root: str | Path, expected: dict[str, str]) -> list[str]:
    """What differs between the files under ``root`` and ``expected`` (missing, changed); empty when intact."""
    root = Path(root)
    problems = []
    for name, digest in sorted(expected.items()):
        path = root / name
        if not path.is_file():
            problems.append(f"{path} is missing")
        elif sha256_file(path) != digest:
            problems.append(f"{path} changed since it was written (sha256 mismatch)")
    return problems
