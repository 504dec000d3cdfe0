"""The embedded SmolLM2 target: the first training steps from a feature cache equal the online ones (EAGLE-3 at the
recipe's shapes and Medusa, fp32 and bf16 storage); the benchmark prints every figure. Slow: CI runs these."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from spec_lightning.datamodules import ChatDataModule, FeatureCacheDataModule
from spec_lightning.modules.eagle3 import Eagle3Module
from spec_lightning.modules.medusa1 import Medusa1Module
from tests.test_feature_cache import fit_losses, write_chats

pytestmark = pytest.mark.slow
TARGET = "smollm2-135m-instruct"


def settings(chats: Path) -> dict:
    return {"tokenizer": TARGET, "data": str(chats), "max_length": 256, "batch_size": 4, "val_fraction": 0.25,
            "max_train_samples": 12}


@pytest.mark.parametrize(("storage", "rel"), [("float32", 1e-5), ("bfloat16", 5e-3)])
def test_smollm2_offline_losses_equal_online(tmp_path, storage, rel):
    chats = write_chats(tmp_path / "chats.jsonl", n=24)

    def eagle3():
        return Eagle3Module(target=TARGET, draft_vocab_size=8192, ttt_length=5)  # configs/eagle3.yaml's shapes

    def medusa():
        return Medusa1Module(target=TARGET, num_heads=3)  # configs/medusa.yaml's

    offline = FeatureCacheDataModule(**settings(chats), cache_dir=str(tmp_path / "cache"), storage_dtype=storage)
    assert offline.write_cache(eagle3().data_requirements(), progress=False)["complete"]  # aux + final: serves both algorithms
    for make in (eagle3, medusa):
        online_losses = fit_losses(make(), ChatDataModule(**settings(chats)))
        offline_losses = fit_losses(make(), FeatureCacheDataModule(**settings(chats), cache_dir=str(tmp_path / "cache"),
                                                                   storage_dtype=storage))
        assert min(online_losses) > 0
        assert offline_losses == pytest.approx(online_losses, rel=rel, abs=0), (make.__name__, storage)


def test_benchmark_prints_every_figure(tmp_path, tiny_target_dir, capsys):
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "feature_cache_throughput.py"
    spec = importlib.util.spec_from_file_location("bench_feature_cache", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    chats = write_chats(tmp_path / "chats.jsonl")
    module.main(["--target", str(tiny_target_dir), "--data", str(chats), "--max_length", "128", "--samples", "8",
                 "--val_samples", "4", "--steps", "2", "--io_mb", "8", "--draft_vocab_size", "256", "--threads", "1"])
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    kinds = [r["benchmark"] for r in rows]
    assert kinds.count("write") == 3 and kinds.count("bytes_per_token") == 3 and kinds.count("step_time") == 2
    assert kinds.count("fidelity") == 2
    assert "shard_io" in kinds and kinds.count("read") == 6
    bpt = {r["storage_dtype"]: r for r in rows if r["benchmark"] == "bytes_per_token"}
    assert bpt["float32"]["measured"]["bytes_per_token"] > bpt["bfloat16"]["measured"]["bytes_per_token"] > \
        bpt["float8_e4m3fn"]["measured"]["bytes_per_token"]
    assert bpt["bfloat16"]["llama3.1-8b"]["all_positions"] == 4 * 4096 * 2 + 5
