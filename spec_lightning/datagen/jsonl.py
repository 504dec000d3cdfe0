"""The one resumable JSONL writer of generated data (``regenerate``, ``synthesize``, the builtin sets).

One writer per output file (an exclusive ``flock`` on ``<out>.lock``). Finished records are appended to
``<out>.partial`` (flush + fsync per append); a rerun reads them back (a torn last line from a crash mid-write is
cut off) and refuses a partial file whose records were written with other settings (the ``header``: every key of it
must equal the same key of the first record's provenance). :meth:`ResumableJsonl.finish` writes every record to a
temp file renamed onto ``<out>`` (``spec_lightning.atomic``) and only then removes the partial file.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO

from spec_lightning.atomic import atomic_file

log = logging.getLogger(__name__)


def read_partial(path: Path) -> list[dict]:
    """Records of an interrupted run; a torn last line (crash mid-write) is cut off the file."""
    if not path.is_file():
        return []
    records: list[dict] = []
    good_end = 0
    with path.open("rb") as f:
        for line in f:
            if not line.endswith(b"\n"):
                break
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                break
            good_end += len(line)
    if good_end != path.stat().st_size:
        log.warning("%s: dropping a torn record at byte %d (interrupted write)", path, good_end)
        with path.open("r+b") as f:
            f.truncate(good_end)
    return records


@contextmanager
def exclusive(lock_path: Path, wait: bool) -> Iterator[None]:
    """Hold an exclusive ``flock`` on ``lock_path`` (waiting for it, or refusing when ``wait`` is false)."""
    import fcntl

    with lock_path.open("a") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            raise ValueError(f"another process is writing {lock_path.with_suffix('')} (lock {lock_path} is held)"
                             ) from None
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def fsync_append(f: IO[str], records: list[dict]) -> None:
    f.write("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
    f.flush()
    os.fsync(f.fileno())


class ResumableJsonl:
    """``with ResumableJsonl(out, header) as w:`` — ``w.done`` holds the records of an interrupted run with the same
    ``header``; ``w.append(records)`` saves progress; ``w.finish()`` writes ``out`` atomically.

    Args:
        out: the ``.jsonl`` to write.
        header: the settings every record's ``provenance`` carries; a partial file written with another header is
            refused (delete it, or rerun with the same settings).
        stamp: more provenance every record carries that a resumed run may change (e.g. the engine's version).
    """

    def __init__(self, out: Path, header: dict, stamp: dict | None = None) -> None:
        self.out, self.header, self.stamp = Path(out), header, dict(stamp or {})
        self.partial = self.out.with_name(self.out.name + ".partial")
        self.done: list[dict] = []
        self._lock = exclusive(self.out.with_name(self.out.name + ".lock"), wait=False)
        self._file: IO[str] | None = None

    def __enter__(self) -> ResumableJsonl:
        self.out.parent.mkdir(parents=True, exist_ok=True)
        self._lock.__enter__()
        try:
            self.done = read_partial(self.partial)
            self._check_header()
            self._file = self.partial.open("a", encoding="utf-8")
        except BaseException:
            self._lock.__exit__(None, None, None)
            raise
        return self

    def __exit__(self, *exc) -> None:
        if self._file is not None:
            self._file.close()
        self._lock.__exit__(*exc)

    def _check_header(self) -> None:
        for record in self.done[:1]:
            old = {k: record.get("provenance", {}).get(k) for k in self.header}
            if old != self.header:
                differs = sorted(k for k in self.header if old[k] != self.header[k])
                raise ValueError(f"{self.partial} was written with other settings ({', '.join(differs)}: "
                                 f"{ {k: old[k] for k in differs} }, now { {k: self.header[k] for k in differs} }); "
                                 "delete it or rerun with the same settings to resume")

    def keep(self, wanted: Callable[[dict], bool]) -> None:
        """Keep only the resumed records ``wanted`` accepts, the last one of each ``id``."""
        self.done = list({r["id"]: r for r in self.done if wanted(r)}.values())

    def append(self, records: list[dict]) -> None:
        """Stamp ``records`` with the header (and ``stamp``), append them to the partial file (fsync'd) and to ``done``."""
        for r in records:
            r.setdefault("provenance", {}).update({**self.header, **self.stamp})
        assert self._file is not None, "append() outside the with block"
        fsync_append(self._file, records)
        self.done.extend(records)

    def finish(self, key: Callable[[dict], object] | None = None) -> list[dict]:
        """Write ``done`` (sorted by ``key`` when given) to ``out`` atomically, then remove the partial file."""
        if key is not None:
            self.done.sort(key=key)
        with atomic_file(self.out) as tmp, tmp.open("w", encoding="utf-8") as f:
            fsync_append(f, self.done)
        self.partial.unlink(missing_ok=True)
        return self.done
