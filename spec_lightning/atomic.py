"""Atomic directory writes: readers see the old directory or the complete new one, never a half-written one."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def atomic_directory(out_dir: str | Path) -> Iterator[Path]:
    """Yield a temp directory beside ``out_dir``; on success it replaces ``out_dir``, on failure it is removed.

    An existing ``out_dir`` is left untouched if anything fails while writing.
    """
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp creates 0700; the result is a normal, shareable directory
    try:
        yield tmp
        for f in tmp.rglob("*"):  # some writers (safetensors) create 0600 files
            if f.is_file():
                os.chmod(f, 0o666 & ~umask)
        if out_dir.exists():
            backup = out_dir.with_name(f".{out_dir.name}.old-{os.getpid()}")
            os.replace(out_dir, backup)
            os.replace(tmp, out_dir)
            shutil.rmtree(backup, ignore_errors=True)
        else:
            os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
