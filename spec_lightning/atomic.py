"""Atomic writes, the one helper every writer uses: readers see the old content or the complete new one.

* :func:`atomic_file`: a temp file beside the destination, fsync'd, then renamed onto it.
* :func:`atomic_directory`: a temp directory beside the destination; on success it replaces the destination as a
  whole, or (``merge=True``) each file written is renamed into an existing directory, whose other files are kept.
* :func:`ensure_free_space`: refuse before writing when the size is known and the file system has less free space.

Temp and backup names carry the writer's pid (``.<name>.tmp-<pid>-*``, ``.<name>.old-<pid>``), so the leftovers of a
killed writer are recognised and removed by the next writer of the same destination (:func:`clean_stale`); a
destination that was moved aside when the writer died is put back first.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from spec_lightning.errors import DiskSpaceError


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _fsync_tree(root: Path) -> None:
    for f in [root, *root.rglob("*")]:
        if f.is_file():
            with f.open("rb") as handle:
                os.fsync(handle.fileno())
        elif f.is_dir():
            _fsync_dir(f)


def clean_stale(out: str | Path) -> list[Path]:
    """Remove temp/backup siblings of ``out`` left by writers that no longer run; return what was removed.

    If ``out`` is missing but a dead writer's backup of it exists (killed between moving the old version aside and
    renaming the new one in), the backup is restored as ``out``.
    """
    out = Path(out)
    pattern = re.compile(rf"^\.{re.escape(out.name)}\.(tmp|old)-(\d+)")
    removed: list[Path] = []
    for folder in (out.parent, out):  # temp dirs live beside ``out``, or inside it when merging (atomic_directory)
        if folder.is_dir():
            removed += _clean_stale_in(folder, out, pattern)
    return removed


def _clean_stale_in(folder: Path, out: Path, pattern: re.Pattern) -> list[Path]:
    removed: list[Path] = []
    for sibling in sorted(folder.iterdir()):
        m = pattern.match(sibling.name)
        if not m or _pid_alive(int(m.group(2))):
            continue
        if m.group(1) == "old" and not out.exists():
            os.replace(sibling, out)  # the writer died after moving the old version aside: put it back
            continue
        if sibling.is_dir() and not sibling.is_symlink():
            shutil.rmtree(sibling, ignore_errors=True)
        else:
            sibling.unlink(missing_ok=True)
        removed.append(sibling)
    return removed


def ensure_free_space(directory: str | Path, needed_bytes: int, what: str) -> None:
    """Refuse (:class:`~spec_lightning.errors.DiskSpaceError`, one line) to write ``needed_bytes`` for ``what`` into
    ``directory`` (or its nearest existing parent) when its file system has less free space."""
    if needed_bytes <= 0:
        return
    folder = Path(directory)
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    free = shutil.disk_usage(folder).free
    if free < needed_bytes:
        raise DiskSpaceError(f"not enough disk space to write {what}: {_size(needed_bytes)} needed, {_size(free)} free "
                             f"in {folder}; free some space or write elsewhere")


def _size(n: int) -> str:
    return f"{n} bytes" if n < 1024 ** 2 else f"{n / 1024 ** 2:.1f} MiB ({n} bytes)"


@contextmanager
def atomic_file(path: str | Path) -> Iterator[Path]:
    """Yield a temp path beside ``path``; on success it is fsync'd and renamed onto ``path``, on failure removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    clean_stale(path)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.tmp-{os.getpid()}-", dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp creates 0600; the result is a normal file
        with tmp.open("rb") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


@contextmanager
def atomic_directory(out_dir: str | Path, merge: bool = False, needed_bytes: int = 0) -> Iterator[Path]:
    """Yield a temp directory; on success its content becomes ``out_dir``.

    Args:
        out_dir: the destination directory.
        merge: ``False``: the temp directory (beside ``out_dir``) replaces ``out_dir`` as a whole (an existing
            ``out_dir`` is moved aside, then removed). ``True``: every file written is renamed into ``out_dir``
            (created if missing), replacing files of the same name and keeping all others; the temp directory is made
            inside an existing ``out_dir``, on its file system, and ``out_dir`` itself is never renamed (it may be a
            mount point, which cannot be).
        needed_bytes: the size about to be written, when known: refused before anything is written if the file
            system has less free space (:func:`ensure_free_space`).

    On failure the temp directory is removed and an existing ``out_dir`` is left untouched.
    """
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    clean_stale(out_dir)
    in_place = merge and out_dir.is_dir()
    staging = out_dir if in_place else out_dir.parent
    ensure_free_space(staging, needed_bytes, str(out_dir))
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-{os.getpid()}-", dir=staging))
    umask = _umask()
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp creates 0700; the result is a normal, shareable directory
    try:
        yield tmp
        for f in tmp.rglob("*"):  # some writers (safetensors) create 0600 files
            os.chmod(f, (0o666 if f.is_file() else 0o777) & ~umask)
        _fsync_tree(tmp)
        if in_place:
            _merge_into(tmp, out_dir)
            shutil.rmtree(tmp, ignore_errors=True)
        elif out_dir.exists():
            backup = out_dir.with_name(f".{out_dir.name}.old-{os.getpid()}")
            os.replace(out_dir, backup)
            os.replace(tmp, out_dir)
            shutil.rmtree(backup, ignore_errors=True)
        else:
            os.replace(tmp, out_dir)
        _fsync_dir(out_dir.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _merge_into(src: Path, dst: Path) -> None:
    """Rename every file of ``src`` to the same relative path under ``dst`` (directories are created)."""
    for f in sorted(src.rglob("*")):
        target = dst / f.relative_to(src)
        if f.is_dir():
            if target.exists() and not target.is_dir():
                raise ValueError(f"{target} exists and is not a directory; cannot write the export's {f.name}/ there")
            target.mkdir(exist_ok=True)
            continue
        if target.is_dir():
            raise ValueError(f"{target} is a directory; cannot replace it with the export's file {f.name}")
        os.replace(f, target)
    _fsync_dir(dst)
