"""Never a silent train on wrong features: each integrity failure is refused with an error naming the file and the
mismatch."""

from __future__ import annotations

import shutil

import pytest

from spec_lightning.datamodules import FeatureCacheDataModule
from spec_lightning.datamodules.feature_cache import FeatureCacheError
from spec_lightning.modules.medusa2 import Medusa2Module
from tests.conftest import make_tiny_llama
from tests.test_feature_cache import build_cache, data_kwargs, eagle3, linked, medusa, write_chats


@pytest.fixture(scope="module")
def built(tmp_path_factory, tiny_target_dir, isolated_cache_root):
    """One cache per module (copied per test), built under the session's isolated cache root."""
    out = tmp_path_factory.mktemp("integrity")
    chats = write_chats(out / "chats.jsonl")
    with pytest.MonkeyPatch.context() as mp:  # a module fixture runs outside the per-test monkeypatch
        mp.setenv("SPEC_LIGHTNING_CACHE", str(isolated_cache_root))
        build_cache(eagle3(tiny_target_dir), tiny_target_dir, chats, out / "cache", shard_size_mb=0.1)
    return out / "cache", chats


@pytest.fixture
def cache(built, tmp_path):
    cache_dir, chats = built
    shutil.copytree(cache_dir, tmp_path / "cache")
    return tmp_path / "cache", chats


def setup_offline(cache_dir, target_dir, chats, module=None, **over):
    module = module if module is not None else eagle3(target_dir)
    dm = linked(FeatureCacheDataModule(**data_kwargs(target_dir, chats, **over), cache_dir=str(cache_dir),
                                       storage_dtype=over.pop("storage_dtype", "float32")), module)
    dm.setup("fit")
    return dm


def test_intact_cache_is_accepted(cache, tiny_target_dir):
    cache_dir, chats = cache
    dm = setup_offline(cache_dir, tiny_target_dir, chats)
    assert len(dm.train_dataset) == 15 and len(dm.val_dataset) == 5
    assert len(list((cache_dir / "shards").glob("train-*.safetensors"))) > 1


def test_truncated_shard(cache, tiny_target_dir):
    cache_dir, chats = cache
    shard = cache_dir / "shards" / "train-00001.safetensors"
    data = shard.read_bytes()
    shard.write_bytes(data[:-100])
    with pytest.raises(FeatureCacheError, match=rf"{shard} is truncated: {len(data) - 100} bytes, the manifest "
                                                rf"records {len(data)}"):
        setup_offline(cache_dir, tiny_target_dir, chats)


def _flip_last_byte(path) -> None:
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))


def test_corrupted_shard_same_size(cache, tiny_target_dir):
    cache_dir, chats = cache
    shard = cache_dir / "shards" / "train-00000.safetensors"
    _flip_last_byte(shard)
    with pytest.raises(FeatureCacheError, match=rf"{shard} is corrupted: its sha256 .* differs from the manifest"):
        setup_offline(cache_dir, tiny_target_dir, chats)


def test_corrupted_shard_found_on_first_use(cache, tiny_target_dir):
    cache_dir, chats = cache
    shard = cache_dir / "shards" / "val-00000.safetensors"
    _flip_last_byte(shard)
    dm = setup_offline(cache_dir, tiny_target_dir, chats, verify="first_use")  # setup checks sizes only
    with pytest.raises(FeatureCacheError, match=rf"{shard} is corrupted"):
        dm.val_dataset[0]


def test_missing_shard(cache, tiny_target_dir):
    cache_dir, chats = cache
    shard = cache_dir / "shards" / "val-00000.safetensors"
    shard.unlink()
    with pytest.raises(FeatureCacheError, match=rf"{shard} is missing"):
        setup_offline(cache_dir, tiny_target_dir, chats)


def test_unfinished_cache_without_manifest(cache, tiny_target_dir):
    cache_dir, chats = cache
    (cache_dir / "manifest.json").unlink()
    (cache_dir / "shards" / "train-00000.json").unlink()  # as if killed before this shard's record
    with pytest.raises(FeatureCacheError, match=rf"{cache_dir}: manifest.json is missing, \d+ of \d+ shards are "
                                                "written .*python cli.py cache"):
        setup_offline(cache_dir, tiny_target_dir, chats)


def test_another_target(cache, tiny_target_dir, tmp_path):
    cache_dir, chats = cache
    other = tmp_path / "other_target"
    shutil.copytree(tiny_target_dir, other)  # same tokenizer and config, other weights
    model = make_tiny_llama(num_layers=6, hidden=32, vocab=49152, max_pos=512, seed=1)
    model.save_pretrained(other)
    with pytest.raises(FeatureCacheError, match=rf"{cache_dir / 'manifest.json'} does not match the target "
                                                rf".*target.weights_fingerprint is '[0-9a-f]+' in the manifest"):
        setup_offline(cache_dir, other, chats, module=eagle3(other))


def test_another_tokenizer_template(cache, tiny_target_dir, tmp_path):
    cache_dir, chats = cache
    other = tmp_path / "retemplated"
    shutil.copytree(tiny_target_dir, other)  # same weights: only the chat template differs
    template = other / "chat_template.jinja"
    template.write_text(template.read_text().replace("<|im_start|>", "<|im_start|> "))
    with pytest.raises(FeatureCacheError, match=r"does not match the tokenizer and chat template .*"
                                                r"tokenizer.fingerprint is '[0-9a-f]+' in the manifest"):
        setup_offline(cache_dir, other, chats, module=eagle3(other))


def test_other_aux_layers(cache, tiny_target_dir):
    cache_dir, chats = cache
    with pytest.raises(FeatureCacheError, match=r"manifest.json does not match the model's aux layers .*"
                                                r"aux_layer_ids is \[1, 2, 2\] in the manifest, \[0, 1, 3\] configured"):
        setup_offline(cache_dir, tiny_target_dir, chats, module=eagle3(tiny_target_dir, aux_layer_ids=[0, 1, 3]))


def test_other_max_length(cache, tiny_target_dir):
    cache_dir, chats = cache
    with pytest.raises(FeatureCacheError, match=r"manifest.json does not match the data settings: data.max_length "
                                                r"is 128 in the manifest, 96 configured"):
        setup_offline(cache_dir, tiny_target_dir, chats, max_length=96)


def test_medusa_needs_enough_stored_heads_and_medusa1(cache, tiny_target_dir):
    cache_dir, chats = cache  # an EAGLE-3 cache serves Medusa-1 modules too (it holds the final hidden states)
    assert setup_offline(cache_dir, tiny_target_dir, chats, module=medusa(tiny_target_dir)).train_dataset
    with pytest.raises(FeatureCacheError, match=r"up to 5 heads .* num_heads=6"):
        setup_offline(cache_dir, tiny_target_dir, chats, module=medusa(tiny_target_dir, num_heads=6))
    with pytest.raises(FeatureCacheError, match="the model trains the target, whose features change every step"):
        setup_offline(cache_dir, tiny_target_dir, chats, module=Medusa2Module(target=str(tiny_target_dir), num_heads=3))
