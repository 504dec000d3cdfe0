"""Resumable training order: a sampler that is a pure function of (seed, epoch) and a DataLoader whose position in
the epoch is saved in every checkpoint.

Lightning saves the ``state_dict()`` of every stateful training dataloader in the fit loop's checkpoint state and
hands it back to ``load_state_dict()`` before the resumed run iterates (``FitLoop.on_save_checkpoint`` /
``_load_combined_loader_states``). :class:`ResumableDataLoader` uses that hook: a run killed after batch k of epoch
e continues with batch k + 1 of the same epoch order, so N steps straight and N/2 steps + kill + resume see the
same batches.

:class:`EpochSampler` is a ``DistributedSampler`` (same permutation, padding and rank interleaving as torch's), so
Lightning keeps it under DDP/FSDP instead of wrapping it; it shards itself from the trainer's
``distributed_sampler_kwargs``. With ``R`` ranks of batch ``b``, step s of the whole job covers the samples at
positions ``[s*R*b, (s+1)*R*b)`` of the epoch's permutation, exactly the samples of step s of one process with
batch ``R*b`` (the last, partial batch of an epoch aside, where the sampler pads with repeats as torch's does).
"""

from __future__ import annotations

import random
from collections.abc import Iterator, Sized
from typing import Any

import numpy as np
import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch.utils.data import DataLoader, DistributedSampler

STATE_VERSION = 1


class EpochSampler(DistributedSampler):
    """Indices of one rank's shard of an epoch; the order is a function of ``(seed, epoch)`` only.

    Args:
        dataset: the (sized) dataset to sample from.
        num_replicas: number of data-parallel ranks.
        rank: this rank.
        shuffle: permute each epoch (``torch.randperm`` seeded ``seed + epoch``, as ``DistributedSampler``).
        seed: shuffling seed.

    ``start`` (a global position in the epoch's padded order) makes the next iteration begin mid-epoch; it applies
    to one iteration and is read when the iteration starts, i.e. after Lightning's ``set_epoch``.
    """

    def __init__(self, dataset: Sized, num_replicas: int = 1, rank: int = 0, shuffle: bool = True,
                 seed: int = 0) -> None:
        if num_replicas < 1 or not 0 <= rank < num_replicas:
            raise ValueError(f"EpochSampler needs 0 <= rank < num_replicas, got rank={rank}, "
                             f"num_replicas={num_replicas}")
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed, drop_last=False)
        self.start = 0

    def global_order(self) -> list[int]:
        """All ranks' indices of the current epoch, padded to a multiple of ``num_replicas`` (DistributedSampler's)."""
        n = len(self.dataset)
        if self.shuffle:
            g = torch.Generator()
            g.manual_seed(self.seed + self.epoch)
            indices = torch.randperm(n, generator=g).tolist()
        else:
            indices = list(range(n))
        padding = self.total_size - n
        while padding > 0:
            indices += indices[:padding]
            padding = self.total_size - len(indices)
        return indices

    def __iter__(self) -> Iterator[int]:  # a generator: epoch and start are read at the first next()
        start, self.start = self.start, 0
        indices = self.global_order()[start:]
        extra = -len(indices) % self.num_replicas  # only when resuming at a position another world size reached
        indices += indices[:extra]
        yield from indices[self.rank::self.num_replicas]


def capture_rng_states() -> dict[str, Any]:
    """The process's random states as tensors and plain data (readable with ``torch.load(weights_only=True)``)."""
    states: dict[str, Any] = {"torch": torch.get_rng_state(), "python": random.getstate()}
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    states["numpy"] = [kind, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached)]
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def restore_rng_states(states: dict[str, Any]) -> None:
    """Inverse of :func:`capture_rng_states`."""
    torch.set_rng_state(states["torch"])
    random.setstate(_tuples(states["python"]))
    kind, keys, pos, has_gauss, cached = states["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


def _tuples(value: Any) -> Any:
    return tuple(_tuples(v) for v in value) if isinstance(value, (list, tuple)) else value


class ResumableDataLoader(DataLoader):
    """A DataLoader over an :class:`EpochSampler` whose position in the epoch is part of the checkpoint.

    ``state_dict()`` holds the epoch, the batches this rank has yielded in it, the global sample position and the
    process's RNG states (torch, CUDA, Python, NumPy); ``load_state_dict()`` makes the next iteration of the same
    epoch skip what was consumed, and restores the RNG states when that iteration yields its first batch (the point
    they were captured at, relative to training). An iteration of another epoch (the checkpoint was written at an
    epoch's last batch) starts from the beginning. The batch count is kept here, not in the sampler, because worker
    processes read the sampler ahead of what training consumed.

    Args:
        dataset: map-style dataset.
        sampler: the epoch sampler (its seed, shuffle and shard define the order); any other sampler (Lightning
            swaps in a sequential one for ``overfit_batches``) makes a plain, non-resuming loader.
        batch_size: samples per batch on this rank.
        restore_rng: restore the saved RNG states on resume.
        **kwargs: other ``DataLoader`` arguments (``collate_fn``, ``num_workers``, ...).
    """

    def __init__(self, dataset: Any, sampler: EpochSampler, batch_size: int = 1, restore_rng: bool = True,
                 **kwargs: Any) -> None:
        # the loader's own generator only seeds worker processes, so iterating never draws from the global RNG
        kwargs.setdefault("generator", torch.Generator().manual_seed(getattr(sampler, "seed", 0)))
        super().__init__(dataset, batch_size=batch_size, sampler=sampler, **kwargs)
        self.restore_rng = restore_rng
        self._epoch = 0
        self._skipped = 0  # batches of this epoch skipped on resume
        self._yielded = 0  # batches yielded by the current iteration
        self._start = 0  # global sample position the current iteration started at
        self._pending: dict[str, Any] | None = None

    def __iter__(self) -> Iterator[Any]:  # a generator: runs at the first next(), after Lightning's set_epoch
        sampler = self.sampler
        if not isinstance(sampler, EpochSampler):  # Lightning swapped the sampler (overfit_batches): a plain loader
            yield from super().__iter__()
            return
        skip, start, rng = 0, 0, None
        pending, self._pending = self._pending, None
        if pending is not None and pending["epoch"] == sampler.epoch:
            skip, start = self._resume_position(pending)
            rng = pending.get("rng") if self.restore_rng else None
        self._epoch, self._skipped, self._yielded, self._start = sampler.epoch, skip, 0, start
        sampler.start = start
        for batch in super().__iter__():
            if rng is not None:
                restore_rng_states(rng)
                rng = None
            self._yielded += 1
            yield batch

    @property
    def _global_batch(self) -> int:
        assert isinstance(self.sampler, EpochSampler)
        return int(self.batch_size or 1) * self.sampler.num_replicas

    def _resume_position(self, state: dict[str, Any]) -> tuple[int, int]:
        """(batches of this rank to skip, global sample position to start at) for a saved position of this epoch."""
        sampler = self.sampler
        assert isinstance(sampler, EpochSampler)
        same_order = (state["dataset_size"], state["seed"], state["shuffle"]) == (
            len(sampler.dataset), sampler.seed, sampler.shuffle)
        if not same_order:
            rank_zero_warn(f"the checkpoint's data position is for {state['dataset_size']} samples, seed "
                           f"{state['seed']}, shuffle {state['shuffle']}; this run has {len(sampler.dataset)}, "
                           f"{sampler.seed}, {sampler.shuffle}: epoch {sampler.epoch} starts from its beginning")
            return 0, 0
        if (state["num_replicas"], state["batch_size"]) == (sampler.num_replicas, self.batch_size):
            batches = int(state["batches"])
            return batches, batches * self._global_batch
        # another world size or batch size: continue at the first sample not consumed (no sample lost or repeated,
        # but the batches are composed differently, so the run is not the uninterrupted one bitwise)
        rank_zero_warn(f"resuming with {sampler.num_replicas} ranks x batch {self.batch_size} from a checkpoint of "
                       f"{state['num_replicas']} x {state['batch_size']}: continuing after sample {state['samples']} "
                       f"of epoch {sampler.epoch}'s order")
        samples = int(state["samples"])
        return samples // self._global_batch, samples

    def state_dict(self) -> dict[str, Any]:
        sampler = self.sampler
        if not isinstance(sampler, EpochSampler):
            return {"version": STATE_VERSION, "resumable": False}
        return {
            "version": STATE_VERSION,
            "epoch": self._epoch,
            "batches": self._skipped + self._yielded,
            "samples": min(self._start + self._yielded * self._global_batch, sampler.total_size),
            "dataset_size": len(sampler.dataset),
            "seed": sampler.seed,
            "shuffle": sampler.shuffle,
            "num_replicas": sampler.num_replicas,
            "batch_size": self.batch_size,
            "rng": capture_rng_states(),
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if not isinstance(state_dict, dict) or state_dict.get("version") != STATE_VERSION:
            raise ValueError(f"unsupported data position in the checkpoint: {str(state_dict)[:120]}")
        if state_dict.get("resumable", True):
            self._pending = dict(state_dict)
