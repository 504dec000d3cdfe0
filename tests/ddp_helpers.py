"""Helpers for the resume, preemption, DDP and FSDP tests: runs of ``cli.py fit`` in subprocesses that record their
per-step losses and final trainable weights, and callbacks that pause a run so a test can kill it at a known step.

The callbacks here are referenced by class path from the YAML overlays the tests write (``ddp_helpers.LossRecorder``),
so the subprocesses get this directory on ``PYTHONPATH``.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch
import yaml
from lightning.pytorch import Callback, LightningModule, Trainer

REPO = Path(__file__).resolve().parent.parent
EAGLE3 = "spec_lightning.modules.eagle3.Eagle3Module"
MEDUSA = "spec_lightning.modules.medusa1.Medusa1Module"
MODEL_ARGS = {EAGLE3: ["--model.draft_vocab_size=49152", "--model.ttt_length=2"], MEDUSA: ["--model.num_heads=2"]}


class LossRecorder(Callback):
    """Append ``{"step", "epoch", "loss", "lr", "rows", "rng_untouched"}`` per training step to ``path`` (JSON
    lines, rank 0) and save the trainable weights to ``weights_path`` when training ends.

    ``loss`` is the mean over ranks; ``rows`` the sorted digests of every sample of the step's global batch (all
    ranks); ``rng_untouched`` whether the step left the global torch RNG as it found it (nothing random in training).
    """

    def __init__(self, path: str, weights_path: str | None = None) -> None:
        self.path = path
        self.weights_path = weights_path
        self._rng: torch.Tensor | None = None

    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        self._rng = torch.get_rng_state()

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        untouched = self._rng is not None and torch.equal(self._rng, torch.get_rng_state())
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        loss = trainer.strategy.reduce(loss.detach().float().clone(), reduce_op="mean")
        ids = batch["input_ids"] * batch["attention_mask"]
        rows = trainer.strategy.all_gather(ids) if trainer.world_size > 1 else ids
        digests = sorted(hash(tuple(r.tolist())) for r in rows.reshape(-1, ids.shape[-1]))
        if trainer.is_global_zero:
            record = {"step": trainer.global_step, "epoch": trainer.current_epoch, "loss": loss.item(),
                      "lr": trainer.optimizers[0].param_groups[0]["lr"], "rows": digests,
                      "rng_untouched": bool(untouched)}
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not self.weights_path:
            return
        state = trainer.strategy.lightning_module_state_dict()  # every rank: FSDP gathers the shards
        if trainer.is_global_zero:
            keep = getattr(pl_module, "keep_in_checkpoint", lambda key: True)
            torch.save({k: v.detach().cpu().clone() for k, v in state.items() if keep(k)}, self.weights_path)


class PauseAt(Callback):
    """At the start of the batch after global step ``step`` (its checkpoint already written), touch ``ready_file``
    and wait: for SIGKILL, or for a SIGTERM (then the batch runs and Lightning's SIGTERM handling takes over)."""

    def __init__(self, step: int, ready_file: str) -> None:
        self.step = step
        self.ready_file = ready_file

    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        if trainer.global_step != self.step:
            return
        Path(self.ready_file).touch()
        deadline = time.monotonic() + 120
        while not trainer.received_sigterm and time.monotonic() < deadline:
            time.sleep(0.02)


def fit_args(root: Path, target_dir: Path, data_file: Path, model_class: str, max_steps: int,
             batch_size: int = 2, max_train_samples: int | None = 5, extra: tuple[str, ...] = ()) -> list[str]:
    """``cli.py fit`` arguments: tiny target, no validation, gradient clipping and an LR warm-up."""
    args = [
        "fit", f"--model={model_class}", f"--model.target={target_dir}", *MODEL_ARGS[model_class],
        "--data=spec_lightning.datamodules.ChatDataModule", f"--data.data={data_file}", "--data.max_length=48",
        f"--data.batch_size={batch_size}", "--data.val_fraction=0.25", "--trainer.accelerator=cpu",
        f"--trainer.max_steps={max_steps}", "--trainer.limit_val_batches=0", "--trainer.num_sanity_val_steps=0",
        "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false", "--trainer.logger=false",
        f"--trainer.default_root_dir={root}", "--trainer.gradient_clip_val=1.0", "--seed_everything=0",
        # a warm-up schedule, so that a resume that lost the scheduler state would train with other learning rates
        "--model.lr_scheduler=torch.optim.lr_scheduler.LinearLR", "--model.lr_scheduler.start_factor=0.1",
        "--model.lr_scheduler.total_iters=10",
    ]
    if max_train_samples is not None:
        args.append(f"--data.max_train_samples={max_train_samples}")
    return args + list(extra)


def callbacks_config(path: Path, record: Path, weights: Path | None = None, ckpt_dir: Path | None = None,
                     pause: tuple[int, Path] | None = None) -> Path:
    """A trainer overlay YAML: the loss recorder, optionally a per-step ModelCheckpoint and a pause."""
    callbacks: list[dict] = [{"class_path": "ddp_helpers.LossRecorder",
                              "init_args": {"path": str(record), "weights_path": str(weights) if weights else None}}]
    if ckpt_dir is not None:
        callbacks.append({"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                          "init_args": {"dirpath": str(ckpt_dir), "every_n_train_steps": 1, "save_top_k": -1,
                                        "save_last": True, "filename": "{step}"}})
    if pause is not None:
        callbacks.append({"class_path": "ddp_helpers.PauseAt",
                          "init_args": {"step": pause[0], "ready_file": str(pause[1])}})
    path.write_text(yaml.safe_dump({"trainer": {"callbacks": callbacks}}))
    return path


def subprocess_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), str(REPO / "tests"), env.get("PYTHONPATH", "")])
    env["OMP_NUM_THREADS"] = "1"  # same threads in every run: bitwise-comparable reductions
    env["PYTHONWARNINGS"] = "ignore"
    return env


def start_cli(args: list[str], cwd: Path, log: Path) -> subprocess.Popen:
    out = open(log, "w")
    return subprocess.Popen([sys.executable, str(REPO / "cli.py"), *args], cwd=cwd, env=subprocess_env(),
                            stdout=out, stderr=subprocess.STDOUT)


def run_cli(args: list[str], cwd: Path, log: Path, timeout: float = 300) -> int:
    proc = start_cli(args, cwd, log)
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        raise AssertionError(f"cli.py {' '.join(args[:2])} timed out; log:\n{log.read_text()[-3000:]}") from None


def wait_for(path: Path, proc: subprocess.Popen, log: Path, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if proc.poll() is not None:
            tail = log.read_text()[-3000:]
            raise AssertionError(f"run ended (code {proc.returncode}) before {path.name}; log:\n{tail}")
        if time.monotonic() > deadline:
            proc.kill()
            raise AssertionError(f"timed out waiting for {path}")
        time.sleep(0.05)


def kill(proc: subprocess.Popen, sig: int = signal.SIGKILL, timeout: float = 120) -> int:
    proc.send_signal(sig)
    return proc.wait(timeout=timeout)


def read_records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def losses_by_step(*paths: Path) -> dict[int, float]:
    """``{step: loss}`` over several record files (a resumed run continues where the first one stopped)."""
    out: dict[int, float] = {}
    for path in paths:
        for r in read_records(path):
            out[r["step"]] = r["loss"]
    return out


def load_weights(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, map_location="cpu", weights_only=True)


def assert_weights_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, f"weights differ: {different[:5]}"


def max_weight_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a if a[k].is_floating_point())


def letters_chat_file(path: Path) -> Path:
    """26 conversations that tokenise to the same length and loss mask (48 tokens, 10 trainable with SmolLM2's
    template): with equal per-rank token counts, the mean of the ranks' losses is the loss of the whole batch, so
    one process and R ranks compute the same quantity and differ only by rounding."""
    rows = [{"id": c, "messages": [{"role": "user", "content": f"Tell me about the letter {c}."},
                                   {"role": "assistant", "content": f"The letter {c} is one of the letters."}]}
            for c in "ABCDEFGHIJKLMNOPQRSTUVWXYZ"]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


def cached_run(base: Path, key: str, args: list[str], overlay_extra: tuple[str, ...] = ()) -> tuple[Path, Path]:
    """Run ``cli.py fit`` once per test session for ``key`` (records + final weights), reused by later tests."""
    root = base / f"run-{key}"
    records, weights = root / "records.jsonl", root / "weights.pt"
    if weights.is_file():
        return records, weights
    if root.exists():
        import shutil

        shutil.rmtree(root)
    root.mkdir(parents=True)
    cfg = callbacks_config(root / "callbacks.yaml", records, weights)
    rc = run_cli([*args, "--trainer.default_root_dir", str(root / "run"), "--config", str(cfg), *overlay_extra],
                 root, root / "log.txt")
    assert rc == 0, (root / "log.txt").read_text()[-3000:]
    return records, weights


# --- one process vs two (test_ddp.py, test_fsdp.py) ----------------------------------------------------------------
CONFIGS = REPO / "configs"
DP_STEPS = 4  # 8 training samples, global batch 4: two epochs


def shared_letters_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.getbasetemp() / "letters.jsonl"
    return path if path.is_file() else letters_chat_file(path)


def run_key(model: str, name: str, model_args: tuple[str, ...]) -> str:
    return "-".join([model.rsplit(".", 1)[1], name, *(a.split("=")[0].rsplit(".", 1)[-1] for a in model_args)])


def one_process_run(tmp_path_factory, target_dir: Path, model: str,
                    model_args: tuple[str, ...] = ()) -> tuple[Path, Path]:
    """One process, batch 4, on :func:`letters_chat_file` (run once per session and ``model_args``)."""
    base = tmp_path_factory.getbasetemp() / "spec_runs"
    data = shared_letters_file(tmp_path_factory)
    return cached_run(base, run_key(model, "one-process", model_args),
                      fit_args(base, target_dir, data, model, DP_STEPS, batch_size=4, max_train_samples=8,
                               extra=model_args))


def two_process_run(tmp_path_factory, target_dir: Path, model: str, preset: str,
                    model_args: tuple[str, ...] = ()) -> tuple[Path, Path]:
    """2 gloo processes of batch 2 with the trainer preset ``configs/trainer/<preset>.yaml``."""
    base = tmp_path_factory.getbasetemp() / "spec_runs"
    data = shared_letters_file(tmp_path_factory)
    args = fit_args(base, target_dir, data, model, DP_STEPS, batch_size=2, max_train_samples=8,
                    extra=(*model_args, "--config", str(CONFIGS / "trainer" / f"{preset}.yaml"),
                           "--trainer.devices=2", "--trainer.accelerator=cpu"))
    return cached_run(base, run_key(model, preset, model_args), args)


def assert_same_training(one: tuple[Path, Path], two: tuple[Path, Path], loss_rtol: float,
                         weight_atol: float) -> dict[str, float]:
    """Same samples per global step, losses within ``loss_rtol``, final weights within ``weight_atol``."""
    a, b = read_records(one[0]), read_records(two[0])
    assert [r["step"] for r in a] == [r["step"] for r in b] == list(range(1, DP_STEPS + 1))
    assert [r["rows"] for r in a] == [r["rows"] for r in b]  # the same samples in every global batch
    la, lb = torch.tensor([r["loss"] for r in a]), torch.tensor([r["loss"] for r in b])
    torch.testing.assert_close(lb, la, rtol=loss_rtol, atol=0.0)
    weight_diff = max_weight_diff(load_weights(one[1]), load_weights(two[1]))
    assert weight_diff <= weight_atol, weight_diff
    return {"loss_abs": (la - lb).abs().max().item(), "weights_abs": weight_diff}

