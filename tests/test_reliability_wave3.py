"""Reliability, third sweep (issue 28): cases that were silent or lossy, each now a named error or correct behaviour.

Each test fails on the code before the fix; nothing here reaches the network (the hub calls are replaced and counted).
"""

from __future__ import annotations

import json
import logging
import shutil
import time

import pytest
import torch

LOCK_NAME = ".spec_lightning-run.lock"  # spec_lightning.run_directory.LOCK_NAME


# --- 4. an empty prompt in an evaluate prompt file ---------------------------------------------------------------
def test_empty_prompts_are_skipped_and_counted(tmp_path, tiny_target_dir, caplog):
    from spec_lightning.datamodules.chat import prompt_ids
    from spec_lightning.datamodules.prompts import prompts_from_file
    from spec_lightning.targets import load_tokenizer

    tok = load_tokenizer(str(tiny_target_dir))
    rows = [[{"role": "user", "content": "What is two plus two?"}],
            [{"role": "user", "content": ""}, {"role": "assistant", "content": "..."}],
            [{"role": "user", "content": "  \n"}],
            [{"role": "user", "content": "Name a colour."}, {"role": "assistant", "content": "Red."}]]
    path = tmp_path / "prompts.jsonl"
    path.write_text("".join(json.dumps({"messages": m}) + "\n" for m in rows))
    with caplog.at_level(logging.WARNING):
        prompts = prompts_from_file(str(path), tok)
    expected = [prompt_ids(tok, [rows[0][0]]), prompt_ids(tok, [rows[3][0]])]  # rendered by hand, lines 1 and 4
    assert prompts == expected
    assert "2 prompts kept, 2 skipped {'empty prompt (the user turn holds no text)': 2}" in caplog.text
    assert f"{path}:2: empty prompt" in caplog.text


# --- 5. draft_vocab_size above the target's vocabulary -----------------------------------------------------------
def test_draft_vocab_above_the_target_vocabulary_is_said_and_recorded(tmp_path):
    from tests.test_eagle3_module import TinyEagle3  # tiny Llama target: 128 tokens

    model = TinyEagle3(draft_vocab_size=1000, ttt_length=2)
    with pytest.warns(UserWarning, match=r"draft_vocab_size=1000 is larger than the target's vocabulary \(128 tokens\)"
                                         r": the draft uses the full vocabulary, Vd=128"):
        model.configure_model()
    assert model.hparams["effective_draft_vocab_size"] == 128 and model.hparams["draft_vocab_size"] == 1000
    assert model.draft.lm_head.weight.shape[0] == 128
    model.export_draft(tmp_path / "export")
    assert json.loads((tmp_path / "export" / "config.json").read_text())["draft_vocab_size"] == 128


# --- 6. a target directory without tokenizer files ---------------------------------------------------------------
def test_a_target_directory_without_tokenizer_files_is_named(tmp_path, tiny_target_dir):
    from spec_lightning.targets import load_tokenizer

    bare = tmp_path / "weights_only"
    bare.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(tiny_target_dir / name, bare / name)
    with pytest.raises(FileNotFoundError, match=rf"target directory {bare} has no tokenizer files: none of "
                                                r"tokenizer\.json, .* \(it holds config\.json, model\.safetensors\)"):
        load_tokenizer(str(bare))


# --- 7. a name that is neither local nor reachable on the hub ----------------------------------------------------
@pytest.fixture
def counted_hub(monkeypatch):
    """The hub's one probe and transformers' loaders replaced by counters: nothing can reach the network."""
    import huggingface_hub
    import transformers
    from huggingface_hub import constants

    import spec_lightning.targets as targets

    clear = getattr(getattr(getattr(targets, "hub", None), "probe_hub", None), "cache_clear", lambda: None)
    calls = {"probe": 0, "from_pretrained": 0}
    answer: dict[str, BaseException] = {}

    def model_info(self, repo_id, **kwargs):
        calls["probe"] += 1
        raise answer["error"]

    def from_pretrained(*args, **kwargs):  # transformers itself: ~50 s of retries offline, then an OSError
        calls["from_pretrained"] += 1
        raise OSError("We couldn't connect to 'https://huggingface.co' to load the files")

    monkeypatch.setattr(huggingface_hub.HfApi, "model_info", model_info)
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", from_pretrained)
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", from_pretrained)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)  # the user's default environment
    clear()  # one probe per process and name: start each test afresh
    yield calls, answer
    clear()


def test_an_unknown_target_name_fails_after_one_hub_try(tmp_path, monkeypatch, counted_hub):
    from spec_lightning.targets import load_target_model, load_tokenizer

    calls, answer = counted_hub
    monkeypatch.chdir(tmp_path)
    answer["error"] = ConnectionError("[Errno -2] Name or service not known")
    start = time.monotonic()
    with pytest.raises(OSError, match=r"target 'my_local_model' is not a local directory, \.gguf file or builtin name "
                                      r".*the Hugging Face hub could not be reached to look it up \(one try: \[Errno -2\] "
                                      r"Name or service not known\); the local hub cache has no copy of it"):
        load_tokenizer("my_local_model")
    with pytest.raises(OSError, match="could not be reached"):
        load_target_model("my_local_model")
    assert time.monotonic() - start < 15
    assert calls == {"probe": 1, "from_pretrained": 0}  # one request per run, never the retrying loaders


def test_a_name_the_hub_does_not_have_is_refused_at_once(tmp_path, monkeypatch, counted_hub):
    from huggingface_hub.errors import RepositoryNotFoundError

    from spec_lightning.targets import load_tokenizer

    calls, answer = counted_hub
    monkeypatch.chdir(tmp_path)
    answer["error"] = RepositoryNotFoundError.__new__(RepositoryNotFoundError)  # the hub's 404 (no response needed)
    with pytest.raises(FileNotFoundError, match=r"the Hugging Face hub has no model 'my_local_model'"):
        load_tokenizer("my_local_model")
    assert calls == {"probe": 1, "from_pretrained": 0}


# --- 2. disk full: checkpoints (exports: tests/test_export_safety.py) ---------------------------------------------
def _one_step_trainer(root):
    from lightning.pytorch.callbacks import ModelCheckpoint

    from spec_lightning.trainer import SpecTrainer

    return SpecTrainer(accelerator="cpu", max_steps=1, logger=False, default_root_dir=str(root),
                       enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                       callbacks=[ModelCheckpoint(dirpath=str(root / "ckpts"))])


def test_a_checkpoint_that_does_not_fit_is_refused_before_writing(tmp_path, monkeypatch):
    import re
    from collections import namedtuple

    from tests.test_medusa_module import TinyData, TinyMedusa

    torch.manual_seed(0)
    _one_step_trainer(tmp_path / "fits").fit(TinyMedusa(num_heads=2), datamodule=TinyData())
    size = next((tmp_path / "fits" / "ckpts").glob("*.ckpt")).stat().st_size  # what a save really writes

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10**9, 10**9 - 1000, 1000))
    root = tmp_path / "full"
    with pytest.raises(OSError, match=r"not enough disk space to write checkpoint .*epoch=0-step=1\.ckpt: .* "
                                             rf"needed, 1000 bytes free in {tmp_path}(/full)?;") as info:  # nearest existing folder
        _one_step_trainer(root).fit(TinyMedusa(num_heads=2), datamodule=TinyData())
    needed = int(re.search(r"(\d+) bytes\)? needed", str(info.value)).group(1))
    assert needed <= size <= needed + 64 * 1024  # the tensor data, all but the pickle framing
    assert not list(root.rglob("*.ckpt"))


# --- 1. two runs, one log directory ------------------------------------------------------------------------------
def _run_args(root, target_dir, data_file, *extra):
    return ["fit", "--model=spec_lightning.modules.medusa1.Medusa1Module", f"--model.target={target_dir}",
            f"--data.data={data_file}", "--data.max_length=64", "--data.batch_size=4", "--data.val_fraction=0.25",
            "--trainer.accelerator=cpu", "--trainer.max_steps=2", "--trainer.limit_val_batches=0",
            "--trainer.log_every_n_steps=1", "--trainer.enable_progress_bar=false",
            "--trainer.enable_model_summary=false", *extra]


def _num_heads(config_yaml) -> int:
    import yaml

    return yaml.safe_load(config_yaml.read_text())["model"]["init_args"]["num_heads"]


def test_two_fits_started_together_on_one_directory_keep_every_file(tmp_path, tiny_target_dir, tiny_chat_file):
    """Two real ``cli.py fit`` processes, same CSV log directory, started at once: each gets its own version."""
    import csv

    from tests.ddp_helpers import start_cli

    logs = tmp_path / "logs"
    procs = [start_cli(_run_args(tmp_path, tiny_target_dir, tiny_chat_file, "--trainer.logger=lightning.pytorch."
                                 f"loggers.CSVLogger", f"--trainer.logger.save_dir={logs}", f"--model.num_heads={h}"),
                       tmp_path, tmp_path / f"run{h}.log") for h in (2, 3)]
    for proc, h in zip(procs, (2, 3)):
        assert proc.wait(timeout=300) == 0, (tmp_path / f"run{h}.log").read_text()[-3000:]
    versions = sorted(p for p in (logs / "lightning_logs").iterdir() if p.is_dir())
    assert [v.name for v in versions] == ["version_0", "version_1"]
    assert sorted(_num_heads(v / "config.yaml") for v in versions) == [2, 3]  # one config each, none overwritten
    for version in versions:
        heads = _num_heads(version / "config.yaml")
        ckpts = list((version / "checkpoints").glob("*.ckpt"))
        assert len(ckpts) == 1  # each run's own checkpoint, of its own model
        saved = torch.load(ckpts[0], map_location="cpu", weights_only=True)
        assert saved["hyper_parameters"]["num_heads"] == heads
        assert {k.split(".")[2] for k in saved["state_dict"] if k.startswith("heads.lm_heads.")} == \
            {str(i) for i in range(heads)}
        rows = [r for r in csv.DictReader((version / "metrics.csv").open()) if r.get("train_loss")]
        assert [int(r["step"]) for r in rows] == [0, 1]  # its own two steps only, not interleaved


def test_a_rerun_into_a_fixed_directory_is_refused_and_a_resume_continues(tmp_path, tiny_target_dir, tiny_chat_file):
    from cli import main

    run = tmp_path / "run"
    args = _run_args(tmp_path, tiny_target_dir, tiny_chat_file, "--trainer.logger=false",
                     f"--trainer.default_root_dir={run}", "--model.num_heads=2")
    main(args=args)
    config, ckpt = run / "config.yaml", run / "checkpoints" / "epoch=0-step=2.ckpt"
    before = config.read_bytes(), ckpt.read_bytes()
    with pytest.raises(ValueError, match=rf"{run} holds an earlier run \(config\.yaml, checkpoints/epoch=0-step="
                                                r"2\.ckpt\); a new run never writes over it: continue that run with "
                                                r"--ckpt_path last \(or a checkpoint in that directory\)"):
        main(args=[*args, "--model.num_heads=3"])
    assert (config.read_bytes(), ckpt.read_bytes()) == before
    cli = main(args=[*args, "--trainer.max_steps=3", "--ckpt_path", str(ckpt)])  # the same run, continued
    assert cli.trainer.global_step == 3 and (run / "checkpoints" / "epoch=0-step=3.ckpt").is_file()


def test_a_directory_a_live_run_writes_into_is_refused(tmp_path, tiny_target_dir, tiny_chat_file):
    import fcntl
    import os

    from cli import main

    run = tmp_path / "run"
    run.mkdir()
    fd = os.open(run / LOCK_NAME, os.O_RDWR | os.O_CREAT)
    os.write(fd, b'{"pid": 4242, "host": "node7"}')
    fcntl.flock(fd, fcntl.LOCK_EX)  # as a running fit holds it
    try:
        with pytest.raises(ValueError, match=rf"another run is writing into {run} \(owner .*\"pid\": 4242"):
            main(args=_run_args(tmp_path, tiny_target_dir, tiny_chat_file, "--trainer.logger=false",
                                f"--trainer.default_root_dir={run}"))
    finally:
        os.close(fd)
    assert sorted(p.name for p in run.iterdir()) == [LOCK_NAME]  # nothing written


def test_ddp_ranks_share_the_version_rank_zero_takes(tmp_path, tiny_target_dir, tiny_chat_file):
    """2 gloo processes, TensorBoard logger, an earlier version_0: the run is version_1 on every rank, version_0 is
    untouched, and no stray version directory appears."""
    from tests.ddp_helpers import run_cli

    logs = tmp_path / "logs"
    earlier = logs / "lightning_logs" / "version_0"
    earlier.mkdir(parents=True)
    (earlier / "config.yaml").write_text("earlier run\n")
    rc = run_cli(_run_args(tmp_path, tiny_target_dir, tiny_chat_file, "--trainer.devices=2", "--trainer.strategy=ddp",
                           "--trainer.logger=lightning.pytorch.loggers.TensorBoardLogger",
                           f"--trainer.logger.save_dir={logs}", "--model.num_heads=2"), tmp_path, tmp_path / "ddp.log")
    assert rc == 0, (tmp_path / "ddp.log").read_text()[-3000:]
    assert sorted(p.name for p in (logs / "lightning_logs").iterdir()) == ["version_0", "version_1"]
    assert (earlier / "config.yaml").read_text() == "earlier run\n" and len(list(earlier.iterdir())) == 1
    run = logs / "lightning_logs" / "version_1"
    assert (run / "config.yaml").is_file() and len(list((run / "checkpoints").glob("*.ckpt"))) == 1
    assert list(run.glob("events.out.tfevents.*"))
