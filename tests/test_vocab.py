"""Draft vocabulary (SPEC §3.4): hand-counted top-Vd, d2t offsets, t2d, identity case, cache fingerprints."""

from __future__ import annotations

import pytest
import torch

from spec_lightning.vocab import (
    DraftVocab,
    build_draft_vocab,
    cached_draft_vocab,
    load_vocab,
    save_vocab,
    vocab_cache_path,
    vocab_fingerprint,
    vocab_from_token_ids,
)

# V = 10. Trainable-token counts by hand (loss_mask == 1 only):
#   row 0: ids [5, 7, 7, 3, 9, 2]  mask [0, 1, 1, 1, 0, 1] -> 7:2, 3:1, 2:1   (5 and 9 not trainable)
#   row 1: ids [9, 9, 9, 3, 8, 6]  mask [0, 0, 0, 1, 1, 1] -> 3:1, 8:1, 6:1   (9 appears 4x but never trainable)
# totals: 3:2, 7:2, 2:1, 6:1, 8:1.  Vd = 3 -> {3, 7} then the tie among 2/6/8 goes to the smallest id, 2.
ROWS = [
    {"input_ids": [5, 7, 7, 3, 9, 2], "loss_mask": [0, 1, 1, 1, 0, 1]},
    {"input_ids": [9, 9, 9, 3, 8, 6], "loss_mask": [0, 0, 0, 1, 1, 1]},
]


def test_hand_counted_top_tokens_offsets_and_t2d() -> None:
    vocab = build_draft_vocab(ROWS, vocab_size=10, draft_vocab_size=3)
    # draft ids 0, 1, 2 -> target ids 2, 3, 7 (sorted by id); offsets = target - draft
    assert vocab.d2t.dtype == torch.int64
    assert vocab.d2t.tolist() == [2 - 0, 3 - 1, 7 - 2]
    assert vocab.t2d.dtype == torch.bool
    assert vocab.t2d.tolist() == [False, False, True, True, False, False, False, True, False, False]


def test_hf_dataset_gives_the_same_mapping() -> None:
    datasets = pytest.importorskip("datasets")
    ds = datasets.Dataset.from_list(ROWS)
    vocab = build_draft_vocab(ds, vocab_size=10, draft_vocab_size=3)
    assert vocab.d2t.tolist() == [2, 2, 5]


def test_identity_when_target_vocab_fits() -> None:
    vocab = build_draft_vocab(ROWS, vocab_size=10, draft_vocab_size=10)
    assert vocab.d2t.tolist() == [0] * 10
    assert vocab.t2d.all() and vocab.t2d.numel() == 10
    assert build_draft_vocab(ROWS, vocab_size=10, draft_vocab_size=32).draft_vocab_size == 10


def test_inconsistent_maps_are_rejected() -> None:
    with pytest.raises(ValueError, match="disagree"):
        DraftVocab(d2t=torch.tensor([0, 0]), t2d=torch.tensor([True, False, True]))


def test_cache_is_reused_for_same_data_and_refused_for_other_data() -> None:
    first = cached_draft_vocab(ROWS, "data-A", vocab_size=10, draft_vocab_size=3)
    path_a = vocab_cache_path(vocab_fingerprint("data-A", 10, 3))
    assert path_a.is_file()
    # same fingerprint: reused without reading the rows at all
    again = cached_draft_vocab([], "data-A", vocab_size=10, draft_vocab_size=3)
    assert torch.equal(first.d2t, again.d2t) and torch.equal(first.t2d, again.t2d)
    # other data -> another key -> built from the other rows, not reused
    other_rows = [{"input_ids": [1, 1, 4, 4, 0], "loss_mask": [1, 1, 1, 1, 1]}]
    other = cached_draft_vocab(other_rows, "data-B", vocab_size=10, draft_vocab_size=3)
    assert other.draft_to_target_ids().tolist() == [0, 1, 4]
    # a file whose stored fingerprint does not match is refused, never silently used
    with pytest.raises(ValueError, match="refusing"):
        load_vocab(path_a, vocab_fingerprint("data-B", 10, 3))
    path_b = vocab_cache_path(vocab_fingerprint("data-B", 10, 3))
    save_vocab(first, path_b, vocab_fingerprint("data-A", 10, 3))  # simulate a wrong file under B's name
    rebuilt = cached_draft_vocab(other_rows, "data-B", vocab_size=10, draft_vocab_size=3)  # rebuilt, not trusted
    assert rebuilt.draft_to_target_ids().tolist() == [0, 1, 4]
    assert load_vocab(path_b, vocab_fingerprint("data-B", 10, 3)).draft_to_target_ids().tolist() == [0, 1, 4]


def test_corrupted_or_edited_vocab_cache_is_rebuilt(caplog) -> None:
    from safetensors.torch import save_file

    rows = [{"input_ids": [1, 1, 4, 4, 7], "loss_mask": [1, 1, 1, 1, 1]}]
    fp = vocab_fingerprint("data-C", 10, 3)
    path = vocab_cache_path(fp)
    good = cached_draft_vocab(rows, "data-C", vocab_size=10, draft_vocab_size=3)
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:  # keep the stored hash, change one token id in both maps
        meta = f.metadata()
    edited = vocab_from_token_ids(torch.tensor([1, 4, 8]), 10)
    save_file({"d2t": edited.d2t, "t2d": edited.t2d}, str(path), metadata=meta)
    with pytest.raises(ValueError, match="do not match the content hash"):
        load_vocab(path, fp)
    assert torch.equal(cached_draft_vocab(rows, "data-C", 10, 3).d2t, good.d2t)
    path.write_bytes(b"garbage" * 10)  # truncated / garbled
    with pytest.raises(ValueError, match="unreadable"):
        load_vocab(path, fp)
    assert torch.equal(cached_draft_vocab(rows, "data-C", 10, 3).d2t, good.d2t)
    assert "rebuilding" in caplog.text


def test_fingerprint_depends_on_vocab_sizes() -> None:
    assert len({vocab_fingerprint("d", 10, 3), vocab_fingerprint("d", 11, 3), vocab_fingerprint("d", 10, 4)}) == 3
