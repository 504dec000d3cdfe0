"""A run owns its log directory: two runs never write into the same one, at the same time or one after the other.

Lightning picks a logger's next ``version_N`` by listing the directories that exist, but creates it only later (when
the config or a log is first written): two runs started together both pick ``version_0`` and overwrite each other's
``config.yaml`` and checkpoints and interleave ``metrics.csv``. A fixed directory (``logger: false`` with
``default_root_dir``, a logger ``version``, a logger without versions) is reused by every run, and the CLI's
``config.yaml`` is overwritten. Here, when ``fit`` starts (``SpecTrainer.fit``, before Lightning creates the logger's
directory or launches DDP processes), rank 0:

* takes the next version by creating ``version_N`` atomically (``mkdir`` fails for all but one run; the others take
  ``N+1``), when the logger (TensorBoard, CSV) was given no version;
* locks the run's log directory (``flock`` on ``.spec_lightning-run.lock``, released when the fit ends or the process
  dies, also by SIGKILL): a second live run is refused, naming the owner;
* refuses a directory that already holds an earlier run (``config.yaml``, ``hparams.yaml``, ``metrics.csv``,
  checkpoints) unless this fit resumes from it (``--ckpt_path last``, or a checkpoint inside that directory).

DDP: the processes Lightning launches inherit the chosen version through the environment
(:data:`VERSION_ENV`), so every rank names the same directory; only rank 0 writes into it.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import socket
import time
from pathlib import Path
from typing import Any

from lightning.pytorch import Trainer
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger

from spec_lightning.checkpoints import LIGHTNING_CKPT_NAMES

LOCK_NAME = ".spec_lightning-run.lock"
RUN_FILES = ("config.yaml", "hparams.yaml", "metrics.csv")
VERSION_ENV = "SPEC_LIGHTNING_RUN_VERSION"  # rank 0 -> the DDP processes it launches: {"root", "version"}
VERSION_DIR = re.compile(r"version_(\d+)")


class RunDirectoryError(ValueError):
    """The run's log directory belongs to another run."""


def picks_version_itself(logger: Any) -> bool:
    """Whether ``logger`` numbers its runs ``version_N`` and was given no version (so a version may be chosen)."""
    return isinstance(logger, (TensorBoardLogger, CSVLogger)) and logger._version is None


def claim_next_version(root: Path) -> int:
    """Create ``root/version_N`` for the smallest N above every existing version, atomically; return N."""
    root.mkdir(parents=True, exist_ok=True)
    taken = [int(m.group(1)) for p in root.iterdir() if p.is_dir() and (m := VERSION_DIR.fullmatch(p.name))]
    n = max(taken, default=-1) + 1
    while True:
        try:
            (root / f"version_{n}").mkdir()
            return n
        except FileExistsError:  # another run took it between the listing and here
            n += 1


def _log_dir(trainer: Trainer) -> Path | None:
    """``trainer.log_dir`` without its broadcast (this runs on rank 0 only)."""
    logger = trainer.loggers[0] if trainer.loggers else None
    if logger is None:
        return Path(trainer.default_root_dir)
    if isinstance(logger, (TensorBoardLogger, CSVLogger)):
        return Path(logger.log_dir)
    return Path(logger.save_dir) if logger.save_dir is not None else None


def _earlier_run(log_dir: Path) -> list[str]:
    found = [name for name in RUN_FILES if (log_dir / name).is_file()]
    checkpoints = sorted((log_dir / "checkpoints").glob("*.ckpt")) if (log_dir / "checkpoints").is_dir() else []
    return found + [f"checkpoints/{p.name}" for p in checkpoints[:3]]


def _resumes_inside(resume_from: Any, log_dir: Path) -> bool:
    """Whether the fit continues the run in ``log_dir``: its checkpoint lies there (``last`` / ``hpc`` as Lightning
    resolves them: a ``*last*.ckpt`` / ``hpc_ckpt_*.ckpt`` there)."""
    if resume_from is None or str(resume_from) in ("best", "registry"):
        return False
    if str(resume_from) in LIGHTNING_CKPT_NAMES:
        pattern = "*last*.ckpt" if str(resume_from) == "last" else "hpc_ckpt_*.ckpt"
        return any(log_dir.rglob(pattern))
    return Path(resume_from).expanduser().resolve().is_relative_to(log_dir.resolve())


class RunDirectory:
    """Give each ``fit`` its own log directory (module docstring); used by :class:`~spec_lightning.trainer.SpecTrainer`.

    Args:
        choose_version: the logger numbers runs and was given no version (:func:`picks_version_itself`).
    """

    def __init__(self, choose_version: bool = False) -> None:
        self.choose_version = choose_version
        self._lock_fd: int | None = None

    def claim(self, trainer: Trainer, resume_from: Any) -> None:
        """Rank 0: take and lock the run's directory (raises :class:`RunDirectoryError`); other ranks: adopt rank 0's
        version. ``resume_from`` is the fit's ``ckpt_path``."""
        logger = trainer.loggers[0] if trainer.loggers else None
        local = logger is None or "://" not in str(getattr(logger, "root_dir", None) or logger.save_dir)
        if not trainer.is_global_zero:
            inherited = json.loads(os.environ.get(VERSION_ENV, "{}"))
            if self.choose_version and inherited.get("root") == str(logger.root_dir):
                logger._version = inherited["version"]
            return
        if self.choose_version and local:
            logger._version = claim_next_version(Path(logger.root_dir))
            os.environ[VERSION_ENV] = json.dumps({"root": str(logger.root_dir), "version": logger._version})
        log_dir = _log_dir(trainer)
        if log_dir is None or not local:
            return
        self._lock(log_dir)
        earlier = _earlier_run(log_dir)
        if earlier and not _resumes_inside(resume_from, log_dir):
            self.release()
            raise RunDirectoryError(
                f"{log_dir} holds an earlier run ({', '.join(earlier)}); a new run never writes over it: continue "
                "that run with --ckpt_path last (or a checkpoint in that directory), or give this one another "
                "directory (--trainer.default_root_dir, or drop the logger's fixed version)")

    def _lock(self, log_dir: Path) -> None:
        log_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(log_dir / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            owner = os.read(fd, 4096).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise RunDirectoryError(f"another run is writing into {log_dir} (owner {owner}); runs never share a log "
                                    "directory: wait for it, or give this one another directory") from None
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                                 "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}).encode())
        self._lock_fd = fd

    def release(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # releases the flock; the file stays (it names the last owner)
            self._lock_fd = None
