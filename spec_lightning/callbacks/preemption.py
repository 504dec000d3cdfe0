"""Preemption: on SIGTERM save a checkpoint, then exit with a code that says "preempted, requeue me".

Cluster schedulers (SLURM, Kubernetes, ...) send SIGTERM before they stop a job. Lightning's signal connector records
it (``trainer.received_sigterm``) and its loops stop with ``SIGTERMException``, a ``SystemExit`` with code 0 and no
checkpoint: the work since the last checkpoint is lost and the job looks finished. This callback saves a checkpoint at
the end of the training batch during which the signal arrived (the same point at which ``ModelCheckpoint`` saves, so
the resumed run continues with the next batch; see ``ResumableDataLoader``) and sets the exit code to ``exit_code``.

Exit code: 143 (= 128 + SIGTERM), what a shell and the schedulers report for a job stopped by SIGTERM; configurable
(e.g. 75, ``EX_TEMPFAIL``, for a scheduler rule that requeues on a code). SLURM's auto-requeue (SIGUSR1 handling,
``hpc_ckpt_*.ckpt``) stays Lightning's.

Resume with ``python cli.py fit <same config> --ckpt_path <checkpoint dir>/last-preempted.ckpt`` (``--ckpt_path last``
finds it too when the checkpoint directory is fixed: Lightning's "last" candidates are ``last*.ckpt`` there).
"""

from __future__ import annotations

import os
from typing import Any

from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import rank_zero_info
from lightning.pytorch.utilities.exceptions import SIGTERMException

PREEMPTED_EXIT_CODE = 143  # 128 + SIGTERM


class PreemptionCheckpoint(Callback):
    """Save ``<dirpath>/<filename>.ckpt`` when the run receives SIGTERM, then exit with ``exit_code``.

    Args:
        dirpath: where to write; ``None``: the directory of the run's ``ModelCheckpoint`` (else
            ``<default_root_dir>/checkpoints``).
        filename: file name without ``.ckpt``; the default ``last-preempted`` is among the files
            ``--ckpt_path last`` considers.
        exit_code: the process exit code after a preemption (default 143 = 128 + SIGTERM).
    """

    def __init__(self, dirpath: str | None = None, filename: str = "last-preempted",
                 exit_code: int = PREEMPTED_EXIT_CODE) -> None:
        if not filename:
            raise ValueError("PreemptionCheckpoint: filename must not be empty")
        if not 1 <= exit_code <= 255:
            raise ValueError(f"PreemptionCheckpoint: exit_code must be in 1..255 (non-zero), got {exit_code}")
        self.dirpath = dirpath
        self.filename = filename
        self.exit_code = exit_code
        self.saved_path: str | None = None
        self._active = True

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        # the CLI adds one by default: a second instance (e.g. also listed in a config) stays passive
        first = next(cb for cb in trainer.callbacks if isinstance(cb, PreemptionCheckpoint))
        self._active = first is self
        self.saved_path = None

    def ckpt_path(self, trainer: Trainer) -> str:
        dirpath = self.dirpath
        if dirpath is None:
            callback = trainer.checkpoint_callback
            dirpath = getattr(callback, "dirpath", None) or os.path.join(trainer.default_root_dir, "checkpoints")
        return os.path.join(dirpath, f"{self.filename}.ckpt")

    def _save(self, trainer: Trainer) -> None:
        path = self.ckpt_path(trainer)
        trainer.save_checkpoint(path, weights_only=False)  # the full training state (optimizer, loops, data)
        self.saved_path = path
        rank_zero_info(f"SIGTERM: saved {path} at global step {trainer.global_step}; exiting with code "
                       f"{self.exit_code} (resume with --ckpt_path {path})")

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        # Single process: stop right here, where the loops' state matches a ModelCheckpoint save. With several ranks
        # the signal reaches them at different times; Lightning broadcasts rank 0's flag at the next batch and all
        # ranks stop there together (saved in ``on_exception``).
        if self._active and trainer.received_sigterm and trainer.world_size == 1:
            self._save(trainer)
            raise SIGTERMException(self.exit_code)

    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        if not self._active or not isinstance(exception, SIGTERMException):
            return
        if self.saved_path is None and trainer.state.fn == TrainerFn.FITTING:
            self._save(trainer)
        exception.code = self.exit_code  # SIGTERMException is a SystemExit: this becomes the process's exit code
