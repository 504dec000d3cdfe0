"""Feature caches: offline training equals online training on the same batches; the reader streams the online
order; the writer resumes, shares work between processes and refuses a too-small disk; the CLI runs end to end."""

from __future__ import annotations

import json
import os
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from lightning.pytorch import Callback, Trainer, seed_everything

from spec_lightning.datamodules import ChatDataModule, FeatureCacheDataModule
from spec_lightning.datamodules.feature_cache import FeatureCacheError, load_manifest
from spec_lightning.datamodules.feature_cache.format import SHARD_DIR
from spec_lightning.modules.eagle3 import Eagle3Module
from spec_lightning.modules.medusa1 import Medusa1Module
from spec_lightning.vocab import draft_vocab_from

MAX_LENGTH = 128
V = 49152  # SmolLM2's tokenizer (the tiny targets use it)


# ------------------------------------------------------------------------ helpers (shared with the other files)
def write_chats(path: Path, n: int = 20) -> Path:
    """Conversations with a system prompt, several turns, and every third ending with an unanswered user turn (its
    tokens after the last trainable one are never stored)."""
    rows = []
    for i in range(n):
        msgs = [{"role": "user", "content": f"Tell me about the number {i}, briefly."},
                {"role": "assistant", "content": f"{i} comes after {i - 1} and before {i + 1}." + " Yes." * (i % 4)},
                {"role": "user", "content": "Thanks! And twice that?"},
                {"role": "assistant", "content": f"Twice {i} is {2 * i}."}]
        if i % 3 == 0:
            msgs.append({"role": "user", "content": "Good night, see you tomorrow then, friend of numbers."})
        rows.append({"id": f"c{i}", "messages": msgs})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def data_kwargs(target_dir, chat_file, **over) -> dict:
    return {"tokenizer": str(target_dir), "data": str(chat_file), "max_length": MAX_LENGTH, "batch_size": 4,
            "val_fraction": 0.25, **over}


def eagle3(target_dir, **over) -> Eagle3Module:
    return Eagle3Module(target=str(target_dir), draft_vocab_size=V, ttt_length=3, **over)  # identity vocab: every
    # teacher position counts (a random tiny target's argmax is mostly outside a small draft vocabulary)


def medusa(target_dir, **over) -> Medusa1Module:
    return Medusa1Module(target=str(target_dir), **{"num_heads": 3, **over})


def linked(dm: FeatureCacheDataModule, module) -> FeatureCacheDataModule:
    """What the CLI does when it builds both: the datamodule gets the module's link (its requirements)."""
    dm.link = module.data_link
    return dm


def build_cache(module, target_dir, chat_file, cache_dir, storage_dtype="float32", **writer) -> dict:
    dm = FeatureCacheDataModule(**data_kwargs(target_dir, chat_file), cache_dir=str(cache_dir),
                                storage_dtype=storage_dtype)
    writer.setdefault("progress", False)
    writer.setdefault("shard_size_mb", 0.05)
    return dm.write_cache(module.data_requirements(), **writer)


class Losses(Callback):
    def __init__(self) -> None:
        self.values: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.values.append(float(outputs["loss"] if isinstance(outputs, dict) else outputs))


def fit_losses(module, datamodule, steps: int = 3) -> list[float]:
    seed_everything(0)
    datamodule.link = module.data_link  # as the CLI links them
    rec = Losses()
    trainer = Trainer(accelerator="cpu", max_steps=steps, limit_val_batches=0, logger=False,
                      enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                      num_sanity_val_steps=0, callbacks=[rec])
    trainer.fit(module, datamodule=datamodule)
    return rec.values


@pytest.fixture(scope="session")
def chats(tmp_path_factory) -> Path:
    return write_chats(tmp_path_factory.mktemp("fc_chats") / "chats.jsonl")


# ------------------------------------------------------------------------ offline training == online training
@pytest.mark.parametrize(("algo", "storage", "tol"), [
    ("eagle3", "float32", 1e-5), ("medusa", "float32", 1e-5), ("eagle3", "bfloat16", 2e-3),
    ("eagle3-packed", "float32", 1e-5),  # packed rows (ChatDataModule pack=True): the same rows, features placed
    # the predicted alignment reads other positions (proved bitwise in test_feature_cache_positions.py)
    pytest.param("eagle3-predicted", "float32", 1e-5, marks=pytest.mark.slow),
    pytest.param("medusa", "bfloat16", 2e-3, marks=pytest.mark.slow)])
def test_offline_losses_equal_online(tmp_path, tiny_target_dir, chats, one_thread, algo, storage, tol):
    def make():
        if algo == "medusa":
            return medusa(tiny_target_dir)
        return eagle3(tiny_target_dir, mask_alignment="predicted" if algo.endswith("predicted") else "specforge")

    pack = {"pack": algo.endswith("packed")}
    build_cache(make(), tiny_target_dir, chats, tmp_path / "cache", storage)
    online = fit_losses(make(), ChatDataModule(**data_kwargs(tiny_target_dir, chats, **pack)))
    offline_module = make()
    dm = FeatureCacheDataModule(**data_kwargs(tiny_target_dir, chats, **pack), cache_dir=str(tmp_path / "cache"),
                                storage_dtype=storage)
    offline = fit_losses(offline_module, dm)
    assert len(online) == len(offline) == 3 and min(online) > 0
    # fp32: the same up to the rounding of the target forward over differently padded batches (<= 1e-6 relative)
    assert offline == pytest.approx(online, rel=tol, abs=0)
    assert type(offline_module.target).__name__ == "TargetHead"  # the decoder was never loaded


def test_offline_batches_are_the_online_batches_in_every_epoch(tmp_path, tiny_target_dir, chats, one_thread):
    module = eagle3(tiny_target_dir)
    build_cache(module, tiny_target_dir, chats, tmp_path / "cache")
    online = ChatDataModule(**data_kwargs(tiny_target_dir, chats))
    online.setup("fit")
    offline = linked(FeatureCacheDataModule(**data_kwargs(tiny_target_dir, chats), cache_dir=str(tmp_path / "cache"),
                                            storage_dtype="float32"), module)
    offline.setup("fit")
    from spec_lightning.targets import FrozenTarget, load_target_model

    target = FrozenTarget(load_target_model(str(tiny_target_dir)))
    aux_ids = [1, 2, 2]  # tiny target: 6 layers -> default [1, 6//2-1, 6-4]
    for epoch in (0, 1):  # the order is a function of (seed, epoch), as online
        a_loader, b_loader = online.train_dataloader(), offline.train_dataloader()
        a_loader.sampler.set_epoch(epoch)
        b_loader.sampler.set_epoch(epoch)
        for a, b in zip(a_loader, b_loader, strict=True):
            for key in ("input_ids", "attention_mask", "loss_mask"):
                assert torch.equal(a[key], b[key])
            feats = target(a["input_ids"], a["attention_mask"], aux_layer_ids=aux_ids)
            stored = b["final_hidden"].abs().sum(-1) > 0
            torch.testing.assert_close(b["final_hidden"][stored], feats.final_hidden[stored], rtol=1e-5, atol=1e-5)
            aux_stored = b["aux_hidden"].abs().sum(-1) > 0
            torch.testing.assert_close(b["aux_hidden"][aux_stored], feats.aux_hidden[aux_stored], rtol=1e-5, atol=1e-5)
    for a, b in zip(online.val_dataloader(), offline.val_dataloader(), strict=True):
        assert torch.equal(a["input_ids"], b["input_ids"]) and torch.equal(a["loss_mask"], b["loss_mask"])


def test_draft_vocab_is_the_online_one(tmp_path, tiny_target_dir, chats):
    module = eagle3(tiny_target_dir)
    build_cache(module, tiny_target_dir, chats, tmp_path / "cache")
    online = ChatDataModule(**data_kwargs(tiny_target_dir, chats))
    offline = linked(FeatureCacheDataModule(**data_kwargs(tiny_target_dir, chats), cache_dir=str(tmp_path / "cache"),
                                            storage_dtype="float32"), module)
    online.setup("fit")
    offline.setup("fit")
    a, b = draft_vocab_from(online.training_tokens(), V, 64), draft_vocab_from(offline.training_tokens(), V, 64)
    assert torch.equal(a.d2t, b.d2t) and torch.equal(a.t2d, b.t2d)
    assert offline.fingerprint == online.fingerprint  # same key: the cached mapping is shared, never recomputed


def test_items_are_read_by_row_ranges_not_whole_shards(tmp_path, tiny_target_dir, chats, monkeypatch):
    module = eagle3(tiny_target_dir)
    build_cache(module, tiny_target_dir, chats, tmp_path / "cache", shard_size_mb=10)  # one shard per split
    dm = linked(FeatureCacheDataModule(**data_kwargs(tiny_target_dir, chats), cache_dir=str(tmp_path / "cache"),
                                       storage_dtype="float32"), module)
    dm.setup("fit")
    ds = dm.train_dataset
    ds[0]  # opens the shard (token columns)
    reads: list[int] = []
    real = os.pread
    monkeypatch.setattr(os, "pread", lambda fd, n, off: reads.append(n) or real(fd, n, off))
    item = ds[3]
    feature_bytes = (item["aux_hidden"].numel() + item["final_hidden"].numel()) * 4
    assert sum(reads) == feature_bytes  # exactly this sample's rows
    assert feature_bytes * 10 < (tmp_path / "cache" / SHARD_DIR / "train-00000.safetensors").stat().st_size


# ------------------------------------------------------------------------ writer
def test_two_writers_write_disjoint_shards_and_the_last_writes_the_manifest(tmp_path, tiny_target_dir, chats):
    module = medusa(tiny_target_dir)
    one = build_cache(module, tiny_target_dir, chats, tmp_path / "one")
    assert one["complete"]
    first = build_cache(module, tiny_target_dir, chats, tmp_path / "two", writer_index=0, num_writers=2)
    assert not first["complete"] and not (tmp_path / "two" / "manifest.json").exists()
    second = build_cache(module, tiny_target_dir, chats, tmp_path / "two", writer_index=1, num_writers=2)
    assert second["complete"]
    a, b = load_manifest(tmp_path / "one"), load_manifest(tmp_path / "two")
    assert [s["sha256"] for s in a["shards"]] == [s["sha256"] for s in b["shards"]]  # same bytes, either way
    assert first["shards_written"] + second["shards_written"] == len(a["shards"]) > 2


def test_writer_refuses_when_the_disk_is_too_small(tmp_path, tiny_target_dir, chats, monkeypatch):
    import spec_lightning.datamodules.feature_cache.writer as writer

    monkeypatch.setattr(writer.shutil, "disk_usage", lambda p: SimpleNamespace(total=10**9, used=10**9, free=1000))
    with pytest.raises(FeatureCacheError, match=r"still has to write about .* only 1.0 KB is free"):
        build_cache(medusa(tiny_target_dir), tiny_target_dir, chats, tmp_path / "cache")
    assert not (tmp_path / "cache" / SHARD_DIR).exists()


def test_writer_refuses_another_plan_in_the_same_directory(tmp_path, tiny_target_dir, chats):
    build_cache(medusa(tiny_target_dir), tiny_target_dir, chats, tmp_path / "cache")
    with pytest.raises(FeatureCacheError, match="holds a cache of another plan .*aux_layer_ids"):
        build_cache(eagle3(tiny_target_dir), tiny_target_dir, chats, tmp_path / "cache")
    assert build_cache(eagle3(tiny_target_dir), tiny_target_dir, chats, tmp_path / "cache", overwrite=True)["complete"]
    assert load_manifest(tmp_path / "cache")["aux_layer_ids"] == [1, 2, 2]


def test_finished_cache_is_not_rewritten(tmp_path, tiny_target_dir, chats):
    build_cache(medusa(tiny_target_dir), tiny_target_dir, chats, tmp_path / "cache")
    again = build_cache(medusa(tiny_target_dir), tiny_target_dir, chats, tmp_path / "cache",
                        load_model=lambda: pytest.fail("the target must not be loaded for a finished cache"))
    assert again["complete"] and again["shards_written"] == 0


KILLER = """
import os, signal, sys
import torch
torch.set_num_threads(1)
sys.path.insert(0, {repo!r})
from tests.test_feature_cache import build_cache, medusa
def hook(stage, name):
    if stage == "data" and name == "train-00002.safetensors":
        os.kill(os.getpid(), signal.SIGKILL)  # after the shard's rename, before its record: the worst moment
build_cache(medusa({target!r}), {target!r}, {chats!r}, {out!r}, hook=hook, shard_size_mb=0.01)
"""


def test_killed_writer_resumes_without_duplicated_or_missing_samples(tmp_path, tiny_target_dir, chats, one_thread):
    import subprocess
    import sys

    repo = str(Path(__file__).resolve().parent.parent)
    script = KILLER.format(repo=repo, target=str(tiny_target_dir), chats=str(chats), out=str(tmp_path / "killed"))
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert proc.returncode == -9, proc.stderr[-2000:]
    shards = tmp_path / "killed" / SHARD_DIR
    assert (shards / "train-00002.safetensors").exists() and not (shards / "train-00002.json").exists()
    assert not (tmp_path / "killed" / "manifest.json").exists()
    with pytest.raises(FeatureCacheError, match=r"manifest.json is missing, 2 of \d+ shards are written"):
        load_manifest(tmp_path / "killed")
    resumed = build_cache(medusa(tiny_target_dir), tiny_target_dir, chats, tmp_path / "killed", shard_size_mb=0.01)
    assert resumed["complete"] and resumed["shards_skipped"] == 2
    build_cache(medusa(tiny_target_dir), tiny_target_dir, chats, tmp_path / "straight", shard_size_mb=0.01)
    a, b = load_manifest(tmp_path / "killed"), load_manifest(tmp_path / "straight")
    assert [s["sha256"] for s in a["shards"]] == [s["sha256"] for s in b["shards"]]
    # every sample exactly once, in the online order
    online = ChatDataModule(**data_kwargs(tiny_target_dir, chats))
    online.setup("fit")
    dm = linked(FeatureCacheDataModule(**data_kwargs(tiny_target_dir, chats), cache_dir=str(tmp_path / "killed"),
                                       storage_dtype="float32"), medusa(tiny_target_dir))
    dm.setup("fit")
    assert [r["input_ids"] for r in dm.train_dataset.token_rows()] == online.train_dataset["input_ids"]
    assert [r["input_ids"] for r in dm.val_dataset.token_rows()] == online.val_dataset["input_ids"]


# ------------------------------------------------------------------------ command line, end to end
def test_cache_cli_then_fit_offline(tmp_path, tiny_target_dir, chats, one_thread):
    import yaml

    from cli import main as cli_main
    from spec_lightning.cache_cli import main as cache_main

    config = yaml.safe_load((Path(__file__).parent.parent / "configs" / "eagle3_offline.yaml").read_text())
    config["model"]["init_args"].update(target=str(tiny_target_dir), draft_vocab_size=256, ttt_length=2)
    config["data"]["init_args"].update(data=str(chats), max_length=MAX_LENGTH, val_fraction=0.25)
    config["trainer"].update(max_steps=2, val_check_interval=2, limit_val_batches=1, enable_progress_bar=False,
                             default_root_dir=str(tmp_path), logger=False)
    config["trainer"]["callbacks"] = config["trainer"]["callbacks"][:1]  # the checkpoint (no logger: no LR monitor)
    config["trainer"]["callbacks"][0]["init_args"]["dirpath"] = str(tmp_path / "ckpt")
    path = tmp_path / "offline.yaml"
    path.write_text(yaml.safe_dump(config))
    estimate = cache_main(["--config", str(path), "--dry_run"])
    summary = cache_main(["--config", str(path), "--no_progress", "--shard_size_mb", "0.1"])
    assert summary["complete"] and summary["bytes"] == pytest.approx(estimate["estimated_bytes"], rel=0.05)
    assert cache_main(["--config", str(path), "--verify"])["verified_shards"] > 1
    cli_main(args=["fit", "--config", str(path)])
    assert list((tmp_path / "ckpt").glob("*.ckpt"))
