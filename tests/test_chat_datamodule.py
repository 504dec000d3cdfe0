"""ChatDataModule: caching, reports, splits and batches."""

import json
import logging

import pytest
import torch

from spec_lightning.datamodules import ChatDataModule, collate_chat
from spec_lightning.datamodules.sources import DataError


def conv(i, words=3):
    return {"id": f"c{i}", "messages": [{"role": "user", "content": f"question {i}"},
                                        {"role": "assistant", "content": " ".join(["word"] * words) + f" {i}"}]}


@pytest.fixture
def data_file(tmp_path):
    path = tmp_path / "chats.jsonl"
    lines = [json.dumps(conv(i)) for i in range(20)]
    lines.insert(3, "{not json")
    lines.append(json.dumps({"messages": [{"role": "user", "content": "alone"}]}))
    lines.append(json.dumps(conv(99, words=400)))  # long
    path.write_text("\n".join(lines) + "\n")
    return path


def test_prepare_reports_skipped_and_truncated(data_file, caplog):
    dm = ChatDataModule(data=str(data_file), max_length=64, batch_size=4, val_fraction=0.2)
    with caplog.at_level(logging.WARNING):
        dm.prepare_data()
    dm.setup("fit")
    rep = dm.report
    assert rep["conversations_read"] == 23 and rep["kept"] == 21 and rep["truncated"] == 1
    assert rep["skipped"] == {"malformed JSON line": 1, "conversation has no assistant turn": 1}
    assert f"{data_file}:4: malformed JSON line" in caplog.text
    assert len(dm.train_dataset) + len(dm.val_dataset) == 21
    assert max(len(x) for x in list(dm.train_dataset["input_ids"]) + list(dm.val_dataset["input_ids"])) == 64


def test_long_sample_skip_and_error_policies(data_file):
    dm = ChatDataModule(data=str(data_file), max_length=64, long_samples="skip")
    dm.prepare_data()
    assert dm.report is None and json.loads((dm.cache_dir / "report.json").read_text())["skipped"][
        "longer than max_length=64"] == 1
    dm = ChatDataModule(data=str(data_file), max_length=64, long_samples="error")
    with pytest.raises(DataError, match=r"chats\.jsonl:23: sample has \d+ tokens, longer than max_length=64"):
        dm.prepare_data()
    assert not dm.cache_dir.exists()  # nothing half-written
    assert not list(dm.cache_dir.parent.glob(f".{dm.cache_dir.name}.tmp-*"))


def test_bad_sample_error_mode_names_line(data_file):
    dm = ChatDataModule(data=str(data_file), on_bad_sample="error")
    with pytest.raises(DataError, match=r"chats\.jsonl:4: malformed JSON line"):
        dm.prepare_data()
    assert not dm.cache_dir.exists()
    assert not list(dm.cache_dir.parent.glob(f".{dm.cache_dir.name}.tmp-*"))  # no temp leftovers


def test_cache_reused_and_keyed_by_settings(data_file, monkeypatch):
    dm = ChatDataModule(data=str(data_file), max_length=64)
    dm.prepare_data()
    calls = []
    import spec_lightning.datamodules.chat_datamodule as mod

    monkeypatch.setattr(mod, "tokenize_source", lambda *a, **k: calls.append(1) or (_ for _ in ()).throw(AssertionError))
    ChatDataModule(data=str(data_file), max_length=64).prepare_data()  # cached: no tokenisation
    assert calls == []
    assert ChatDataModule(data=str(data_file), max_length=65).fingerprint != dm.fingerprint
    before = dm.fingerprint
    data_file.write_text(data_file.read_text() + json.dumps(conv(500)) + "\n")
    assert ChatDataModule(data=str(data_file), max_length=64).fingerprint != before  # data changed


def test_split_is_seeded_and_disjoint(data_file):
    def ids(seed):
        dm = ChatDataModule(data=str(data_file), max_length=64, val_fraction=0.25, seed=seed)
        dm.setup("fit")
        return dm.train_dataset["id"], dm.val_dataset["id"]

    a, b, c = ids(0), ids(0), ids(1)
    assert list(a[0]) == list(b[0]) and list(a[1]) == list(b[1]) and list(a[1]) != list(c[1])
    assert not set(a[0]) & set(a[1])


def test_batches_are_right_padded(data_file):
    dm = ChatDataModule(data=str(data_file), max_length=64, batch_size=3, val_fraction=0.3)
    dm.setup("fit")
    batch = next(iter(dm.val_dataloader()))
    rows = [dm.val_dataset[i] for i in range(3)]
    for i, r in enumerate(rows):
        n = len(r["input_ids"])
        assert batch["input_ids"][i, :n].tolist() == r["input_ids"]
        assert batch["loss_mask"][i, :n].tolist() == r["loss_mask"]
        assert batch["attention_mask"][i].tolist() == [1] * n + [0] * (batch["input_ids"].shape[1] - n)
        assert batch["loss_mask"][i, n:].sum() == 0


def test_collate_hand_built():
    out = collate_chat([{"input_ids": [5, 6, 7], "loss_mask": [0, 1, 1]}, {"input_ids": [8], "loss_mask": [1]}], pad_id=0)
    assert out["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert out["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert out["loss_mask"].tolist() == [[0, 1, 1], [1, 0, 0]]
    assert out["input_ids"].dtype == torch.long


def test_invalid_options_are_named():
    with pytest.raises(ValueError, match="long_samples must be"):
        ChatDataModule(long_samples="drop")
    with pytest.raises(ValueError, match="val_fraction must be in"):
        ChatDataModule(val_fraction=1.5)
