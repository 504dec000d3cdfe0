"""Exact resume: N steps straight == N/2 steps + kill -9 + resume from the last checkpoint, bitwise on CPU.

The data order is a function of (seed, epoch) (``EpochSampler``) and the training loader's position is part of every
checkpoint (``ResumableDataLoader``, saved by Lightning's fit loop); optimizer, LR scheduler, global step and loop
progress are Lightning's. The training step itself draws nothing from the global RNG (recorded per step), and the
loader also carries the RNG states across a resume.
"""

from __future__ import annotations

import pickle
import random

import numpy as np
import pytest
import torch
from ddp_helpers import (
    EAGLE3,
    MEDUSA,
    assert_weights_equal,
    cached_run,
    callbacks_config,
    fit_args,
    kill,
    load_weights,
    read_records,
    run_cli,
    start_cli,
    wait_for,
)
from torch.utils.data import DistributedSampler

from spec_lightning.datamodules.sampling import EpochSampler, ResumableDataLoader

# --- the sampler and the loader ---------------------------------------------------------------------------------


def _loader(n: int = 10, batch: int = 3, num_workers: int = 0, seed: int = 0) -> ResumableDataLoader:
    return ResumableDataLoader(list(range(n)), sampler=EpochSampler(list(range(n)), seed=seed), batch_size=batch,
                               num_workers=num_workers, collate_fn=lambda rows: rows)


def test_order_is_a_function_of_seed_and_epoch_and_matches_torch():
    data = list(range(11))
    a, b = EpochSampler(data, seed=3), EpochSampler(data, seed=3)
    a.set_epoch(2), b.set_epoch(2)
    assert list(a) == list(b) and sorted(a) == data
    b.set_epoch(3)
    assert list(a) != list(b)
    for rank in (0, 1):  # the very order (and padding) of torch's DistributedSampler
        ours, torchs = EpochSampler(data, 2, rank, seed=3), DistributedSampler(data, 2, rank, seed=3)
        ours.set_epoch(5), torchs.set_epoch(5)
        assert list(ours) == list(torchs)


def test_rank_shards_make_up_the_one_process_global_batches():
    """R ranks of batch b: step s covers exactly the samples of step s of one process with batch R*b."""
    data, b, R = list(range(24)), 2, 3
    one = list(EpochSampler(data, seed=1))
    shards = [list(EpochSampler(data, R, r, seed=1)) for r in range(R)]
    assert sorted(sum(shards, [])) == data  # disjoint, complete (24 is a multiple of R)
    for s in range(len(data) // (R * b)):
        assert sorted(sum((sh[s * b:(s + 1) * b] for sh in shards), [])) == sorted(one[s * R * b:(s + 1) * R * b])


@pytest.mark.parametrize("num_workers", [0, 2])
def test_loader_resumes_mid_epoch(num_workers):
    straight = _loader(num_workers=num_workers)
    straight.sampler.set_epoch(1)
    it = iter(straight)
    seen = [next(it), next(it)]
    state = pickle.loads(pickle.dumps(straight.state_dict()))  # what a checkpoint holds
    rest = list(it)
    assert state["epoch"] == 1 and state["batches"] == 2 and state["samples"] == 6  # not what workers prefetched

    resumed = _loader(num_workers=num_workers)
    resumed.load_state_dict(state)
    resumed.sampler.set_epoch(1)  # Lightning sets the epoch after creating the iterator; the order is read lazily
    assert list(resumed) == rest
    assert resumed.state_dict()["batches"] == len(resumed) == 4
    assert sorted(sum(seen + rest, [])) == list(range(10))
    resumed.sampler.set_epoch(2)  # the next epoch is whole again
    assert sorted(sum(list(resumed), [])) == list(range(10))


def test_position_saved_at_an_epoch_end_starts_the_next_epoch_whole():
    loader = _loader()
    full = list(loader)
    resumed = _loader()
    resumed.load_state_dict(loader.state_dict())  # epoch 0, all 4 batches consumed
    resumed.sampler.set_epoch(1)
    epoch1 = list(resumed)
    loader.sampler.set_epoch(1)
    assert epoch1 == list(loader) and sorted(sum(epoch1, [])) == sorted(sum(full, []))


def test_state_restores_rng_and_loads_weights_only(tmp_path):
    loader = _loader()
    it = iter(loader)
    next(it)
    torch.manual_seed(7), random.seed(7), np.random.seed(7)
    state = loader.state_dict()
    expected = (torch.rand(3), random.random(), np.random.rand())
    second = next(it)
    torch.save(state, tmp_path / "state.pt")
    state = torch.load(tmp_path / "state.pt", weights_only=True)  # the project reads checkpoints weights-only

    resumed = _loader()
    resumed.load_state_dict(state)
    torch.manual_seed(0), random.seed(0), np.random.seed(0)  # another process: other RNG states
    assert next(iter(resumed)) == second
    assert torch.equal(torch.rand(3), expected[0]) and random.random() == expected[1]
    assert np.random.rand() == expected[2]


def test_changed_data_restarts_the_epoch_with_a_warning():
    state = _loader(n=10).state_dict() | {"batches": 2, "samples": 6}
    other = _loader(n=12)
    other.load_state_dict(state)
    with pytest.warns(UserWarning, match="starts from its beginning"):
        assert len(list(other)) == 4


# --- end to end: kill -9 and resume -------------------------------------------------------------------------------

# 5 training samples, batch 2: 3 batches per epoch (the last one partial), so 8 steps cross two epoch boundaries.
CASES = {
    # killed after step 4: one batch into epoch 1; the resumed run finishes epoch 1 and runs epoch 2
    "eagle3-mid-epoch": (EAGLE3, 8, 4),
    # killed after step 3: the last batch of epoch 0; the resumed run must start epoch 1 whole
    "medusa-epoch-end": (MEDUSA, 6, 3),
}


def straight_run(tmp_path_factory, target_dir, data_file, model: str, steps: int):
    base = tmp_path_factory.getbasetemp() / "spec_runs"
    key = f"{model.rsplit('.', 1)[1]}-{steps}-resume"
    return cached_run(base, key, fit_args(base, target_dir, data_file, model, steps))


@pytest.mark.parametrize("case", [pytest.param("eagle3-mid-epoch"),
                                  pytest.param("medusa-epoch-end", marks=pytest.mark.slow)])  # ~25-45 s each
def test_sigkill_then_resume_is_bitwise_the_straight_run(case, tmp_path, tmp_path_factory, tiny_target_dir,
                                                         tiny_chat_file):
    model, steps, kill_after = CASES[case]
    records, weights = straight_run(tmp_path_factory, tiny_target_dir, tiny_chat_file, model, steps)

    ckpt_dir, ready = tmp_path / "ckpts", tmp_path / "ready"
    cfg = callbacks_config(tmp_path / "killed.yaml", tmp_path / "killed.jsonl", ckpt_dir=ckpt_dir,
                           pause=(kill_after, ready))
    proc = start_cli(fit_args(tmp_path / "k", tiny_target_dir, tiny_chat_file, model, steps,
                              extra=("--config", str(cfg))), tmp_path, tmp_path / "killed.log")
    wait_for(ready, proc, tmp_path / "killed.log")  # paused at the start of step kill_after + 1
    assert kill(proc) == -9
    last = ckpt_dir / "last.ckpt"
    assert torch.load(last, map_location="cpu", weights_only=True)["global_step"] == kill_after

    cfg = callbacks_config(tmp_path / "resumed.yaml", tmp_path / "resumed.jsonl", tmp_path / "resumed.pt",
                           ckpt_dir=ckpt_dir)
    rc = run_cli(fit_args(tmp_path / "r", tiny_target_dir, tiny_chat_file, model, steps,
                          extra=("--config", str(cfg), "--ckpt_path", str(last))), tmp_path, tmp_path / "resumed.log")
    assert rc == 0, (tmp_path / "resumed.log").read_text()[-3000:]

    straight = read_records(records)
    interrupted = read_records(tmp_path / "killed.jsonl") + read_records(tmp_path / "resumed.jsonl")
    assert [r["step"] for r in interrupted] == list(range(1, steps + 1))  # nothing replayed, nothing skipped
    assert [r["epoch"] for r in interrupted] == [r["epoch"] for r in straight]
    assert [r["rows"] for r in interrupted] == [r["rows"] for r in straight]  # the same samples, in order
    assert [r["loss"] for r in interrupted] == [r["loss"] for r in straight]  # bitwise
    assert [r["lr"] for r in interrupted] == [r["lr"] for r in straight]  # the LR schedule continued
    assert straight[-1]["lr"] > straight[0]["lr"]  # (it is a warm-up)
    assert all(r["rng_untouched"] for r in straight + interrupted)  # nothing random inside a training step
    assert_weights_equal(load_weights(weights), load_weights(tmp_path / "resumed.pt"))


def test_a_swapped_sampler_makes_a_plain_loader():
    """Lightning rebuilds the loader with a sequential sampler for ``overfit_batches``: it must still iterate."""
    from torch.utils.data import SequentialSampler

    loader = ResumableDataLoader(list(range(5)), sampler=SequentialSampler(range(5)), batch_size=2,
                                 collate_fn=lambda rows: rows)
    assert list(loader) == [[0, 1], [2, 3], [4]]
    loader.load_state_dict(loader.state_dict())  # "not resumable": ignored
    assert list(loader) == [[0, 1], [2, 3], [4]]
