"""show-data prints exactly the trainable tokens between [[ ]] (checked against the mask by hand)."""

from __future__ import annotations

from cli import main
from spec_lightning.datamodules.show import render_mask
from tests.chat_templates import tokenizer_for


def test_trainable_runs_are_bracketed():
    tok = tokenizer_for("chatml")
    ids = tok("Hi there you", add_special_tokens=False)["input_ids"]
    assert len(ids) == 3
    assert render_mask(tok, ids, [0, 1, 1]) == "Hi[[ there you]]"
    assert render_mask(tok, ids, [1, 0, 1]) == "[[Hi]] there[[ you]]"


def test_cli_shows_assistant_turns_only(tiny_chat_file, capsys):
    shown = main(args=["show-data", "--target", "smollm2-135m-instruct", "--data", str(tiny_chat_file), "--num", "1"])
    out = capsys.readouterr().out
    assert "[[The number 0 comes after -1 and before 1.<|im_end|>]]" in shown[0]
    assert "[[You are welcome.<|im_end|>]]" in shown[0] and "[[Tell me" not in shown[0]
    assert "tokens," in out and "trainable" in out
