"""Every online recipe trains under bf16-mixed with its own optimiser, clipping and callbacks (tiny target, CPU).

The recipes set fused AdamW and ``gradient_clip_val``; under Lightning's own bf16 ``MixedPrecision`` plugin that
combination stopped at the first optimiser step (the fp32 tests never saw it). Each recipe runs two steps and one
validation (with its acceptance callback decoding in bf16) through ``cli.py fit``.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from cli import main

CONFIGS = Path(__file__).resolve().parent.parent / "configs"
RECIPES = ["eagle3.yaml", "medusa.yaml", "medusa2.yaml", "draft_lm.yaml", "llama3.1-8b-eagle3.yaml", "qwen3-8b-eagle3.yaml",
           "llama3.1-8b-medusa.yaml"]

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("recipe", RECIPES, ids=[r.removesuffix(".yaml") for r in RECIPES])
def test_recipe_trains_and_validates_under_bf16_mixed(recipe, tmp_path, tiny_target_dir, tiny_chat_file):
    main(args=[
        "fit", "--config", str(CONFIGS / recipe), f"--model.init_args.target={tiny_target_dir}",
        "--model.init_args.target_dtype=auto", f"--data.init_args.data={tiny_chat_file}",
        "--data.init_args.max_length=48", "--data.init_args.batch_size=2", "--data.init_args.max_val_samples=4",
        "--trainer.accelerator=cpu", "--trainer.devices=1", "--trainer.strategy=auto", "--trainer.precision=bf16-mixed",
        "--trainer.max_steps=2", "--trainer.max_time=null", "--trainer.val_check_interval=2",
        "--trainer.limit_val_batches=1", "--trainer.enable_progress_bar=false", f"--trainer.default_root_dir={tmp_path}",
        f"--trainer.logger.init_args.save_dir={tmp_path}",
    ])
    ckpts = sorted(p.name for p in tmp_path.rglob("*.ckpt"))
    assert any("step=2" in name for name in ckpts), ckpts
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    (events,) = tmp_path.rglob("events.out.tfevents.*")
    logged = EventAccumulator(str(events.parent))
    logged.Reload()
    tags = logged.Tags()["scalars"]
    assert any(t.startswith("val") for t in tags), tags  # the validation ran (and its metrics are finite)
    assert all(all(abs(e.value) < float("inf") for e in logged.Scalars(t)) for t in tags)
