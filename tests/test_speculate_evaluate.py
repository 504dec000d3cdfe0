"""``python cli.py evaluate``: from a fit checkpoint or an exported draft, on the held-out split or a prompt file."""

from __future__ import annotations

import json

import pytest

from cli import main
from spec_lightning.modules.eagle3 import Eagle3Module

pytestmark = pytest.mark.usefixtures("one_thread")


def json_line(out: str) -> dict:
    lines = [line for line in out.splitlines() if line.startswith("{")]
    assert len(lines) == 1, out
    return json.loads(lines[0])


EVAL_ARGS = ["--num_prompts=2", "--max_new_tokens=8", "--trainer.logger=false", "--trainer.enable_progress_bar=false"]


def test_evaluate_checkpoint_on_held_out_split_and_export_on_prompt_file(tmp_path, tiny_target_dir, tiny_chat_file,
                                                                          capsys):
    main(args=[
        "fit", "--model=spec_lightning.modules.medusa1.Medusa1Module", f"--model.target={tiny_target_dir}",
        "--model.num_heads=2", f"--data.data={tiny_chat_file}", "--data.max_length=64", "--data.batch_size=4",
        "--data.val_fraction=0.25", "--trainer.accelerator=cpu", "--trainer.max_steps=2", "--trainer.limit_val_batches=1",
        "--trainer.enable_progress_bar=false", f"--trainer.default_root_dir={tmp_path}", "--trainer.logger=false",
    ])
    ckpt = next(tmp_path.rglob("*.ckpt"))
    config = next(tmp_path.rglob("config.yaml"))
    capsys.readouterr()
    main(args=["evaluate", "--config", str(config), "--ckpt_path", str(ckpt), "--num_draft_tokens=2", *EVAL_ARGS])
    out = capsys.readouterr().out
    result = json_line(out)
    assert "acceptance length τ" in out and "speedup" in out
    assert result["algorithm"] == "medusa1" and result["prompts"] == 2
    assert result["identical_outputs"] == 2  # greedy speculative output == the target's own
    assert 1.0 <= result["accept_length"] <= 3.0 and len(result["position_rates"]) == 2
    assert result["spec_tokens_per_s"] > 0 and result["baseline_tokens_per_s"] > 0

    export = tmp_path / "medusa-export"
    main(args=["export", "--config", str(config), "--ckpt_path", str(ckpt), "--out_dir", str(export)])
    capsys.readouterr()
    main(args=["evaluate", "--config", str(config), "--draft_dir", str(export), "--prompts", str(tiny_chat_file),
               "--mode=tree", *EVAL_ARGS])
    result = json_line(capsys.readouterr().out)
    assert result["mode"] == "tree" and result["identical_outputs"] == 2


def test_evaluate_exported_eagle3_draft_with_tree(tmp_path, tiny_target_dir, tiny_chat_file, capsys):
    module = Eagle3Module(target=str(tiny_target_dir), draft_vocab_size=256, ttt_length=2)
    module.configure_model()
    export = module.export_draft(str(tmp_path / "eagle3-export"))
    for mode in ("chain", "tree"):
        capsys.readouterr()
        main(args=["evaluate", "--model=spec_lightning.modules.eagle3.Eagle3Module",
                   f"--model.target={tiny_target_dir}", "--model.draft_vocab_size=256", "--draft_dir", str(export),
                   "--prompts", str(tiny_chat_file), f"--mode={mode}", "--tree_total_tokens=8", *EVAL_ARGS])
        result = json_line(capsys.readouterr().out)
        assert result["algorithm"] == "eagle3" and result["identical_outputs"] == 2


def test_evaluate_needs_exactly_one_draft_source(tiny_target_dir, tmp_path):
    with pytest.raises(ValueError, match="exactly one of --ckpt_path"):
        main(args=["evaluate", "--model=spec_lightning.modules.medusa1.Medusa1Module",
                   f"--model.target={tiny_target_dir}", "--trainer.logger=false"])
    with pytest.raises(FileNotFoundError, match="draft directory not found"):
        main(args=["evaluate", "--model=spec_lightning.modules.medusa1.Medusa1Module",
                   f"--model.target={tiny_target_dir}", "--trainer.logger=false", "--draft_dir",
                   str(tmp_path / "missing")])
