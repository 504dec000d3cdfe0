"""Caches verify themselves: content-hashed fingerprints, corrupted or edited caches rebuilt, bad lines skipped."""

from __future__ import annotations

import json
import logging
import os

from spec_lightning.datamodules import ChatDataModule
from spec_lightning.datamodules.sources import read_conversations


def conv(i: int) -> dict:
    return {"id": f"c{i}", "messages": [{"role": "user", "content": f"question {i}"},
                                        {"role": "assistant", "content": f"answer number {i}"}]}


def write(path, rows) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_source_edited_with_same_size_and_mtime_is_not_stale(tmp_path):
    path = tmp_path / "chats.jsonl"
    write(path, [conv(i) for i in range(10)])
    first = ChatDataModule(data=str(path), max_length=64)
    first.setup("fit")
    stat = path.stat()
    text = path.read_text().replace("answer number 3", "answer number 8")  # same length
    path.write_text(text)
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert path.stat().st_size == stat.st_size and path.stat().st_mtime_ns == stat.st_mtime_ns
    second = ChatDataModule(data=str(path), max_length=64)
    assert second.fingerprint != first.fingerprint
    second.setup("fit")
    decoded = [second.tokenizer.decode(r) for r in list(second.train_dataset["input_ids"]) +
               list(second.val_dataset["input_ids"])]
    assert not any("answer number 3" in d for d in decoded)


def test_corrupted_or_edited_data_cache_is_rebuilt(tmp_path, caplog):
    path = tmp_path / "chats.jsonl"
    write(path, [conv(i) for i in range(10)])
    dm = ChatDataModule(data=str(path), max_length=64)
    dm.prepare_data()
    arrow = next((dm.cache_dir / "dataset").glob("*.arrow"))
    original = arrow.read_bytes()
    # a token id changed inside the valid file: same size, still loadable
    dm.setup("fit")
    row = dm.train_dataset[0]
    token = next(t for t, m in zip(row["input_ids"], row["loss_mask"], strict=True) if m)
    width = 8 if dm.train_dataset.features["input_ids"].feature.dtype == "int64" else 4
    needle = int(token).to_bytes(width, "little")
    assert needle in original
    arrow.write_bytes(original.replace(needle, (1).to_bytes(width, "little"), 1))
    with caplog.at_level(logging.WARNING):
        fresh = ChatDataModule(data=str(path), max_length=64)
        fresh.setup("fit")
    assert "failed verification" in caplog.text and "changed since it was written" in caplog.text
    assert arrow.read_bytes() == original  # rebuilt to the true content
    # truncated / garbled file
    arrow.write_bytes(original[: len(original) // 3])
    again = ChatDataModule(data=str(path), max_length=64)
    again.setup("fit")
    assert arrow.read_bytes() == original


def test_non_utf8_line_is_one_bad_sample_naming_file_and_line(tmp_path):
    path = tmp_path / "mixed.jsonl"
    good = [json.dumps(conv(i)).encode() for i in range(3)]
    path.write_bytes(good[0] + b"\n" + b'{"messages": "caf\xe9"}\n' + good[1] + b"\n" + good[2] + b"\n")
    read = read_conversations(str(path))
    assert len(read.conversations) == 3
    assert [str(b) for b in read.bad] == [f"{path}:2: not valid UTF-8 (byte 0xe9 at column 18)"]
