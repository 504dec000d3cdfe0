"""Reading conversations: formats, shapes and clear messages for bad input."""

import json

import pytest

from spec_lightning.datamodules.sources import DataError, read_conversations

OPENAI = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
SHAREGPT = {"conversations": [{"from": "system", "value": "s"}, {"from": "human", "value": "hi"},
                              {"from": "gpt", "value": "hello"}]}


def write_jsonl(path, lines):
    path.write_text("\n".join(x if isinstance(x, str) else json.dumps(x) for x in lines) + "\n")
    return path


def test_jsonl_both_shapes(tmp_path):
    res = read_conversations(str(write_jsonl(tmp_path / "d.jsonl", [OPENAI, SHAREGPT])))
    assert not res.bad
    assert res.conversations[0]["messages"] == OPENAI["messages"]
    assert res.conversations[1]["messages"] == [
        {"role": "system", "content": "s"}, {"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}
    ]
    assert res.conversations[1]["origin"].endswith("d.jsonl:2")


def test_json_list_parquet_and_datasets_dir(tmp_path):
    import datasets

    (tmp_path / "d.json").write_text(json.dumps([OPENAI, OPENAI]))
    assert len(read_conversations(str(tmp_path / "d.json")).conversations) == 2
    ds = datasets.Dataset.from_list([SHAREGPT] * 3)
    ds.to_parquet(str(tmp_path / "d.parquet"))
    assert len(read_conversations(str(tmp_path / "d.parquet")).conversations) == 3
    ds.save_to_disk(str(tmp_path / "dsdir"))
    res = read_conversations(str(tmp_path / "dsdir"))
    assert len(res.conversations) == 3 and res.conversations[2]["messages"][2]["content"] == "hello"


def test_malformed_json_line_names_file_and_line(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [OPENAI, '{"messages": [', OPENAI])
    res = read_conversations(str(path))
    assert len(res.conversations) == 2
    assert len(res.bad) == 1 and str(res.bad[0]).startswith(f"{path}:2: malformed JSON line")


def test_unknown_role_names_line_and_role(tmp_path):
    bad = {"messages": [{"role": "user", "content": "a"}, {"role": "wizard", "content": "b"}]}
    path = write_jsonl(tmp_path / "d.jsonl", [OPENAI, bad])
    res = read_conversations(str(path))
    assert str(res.bad[0]).startswith(f"{path}:2: turn 1: unknown role 'wizard'")


def test_no_assistant_turn_is_reported(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"messages": [{"role": "user", "content": "a"}]}, OPENAI])
    res = read_conversations(str(path))
    assert str(res.bad[0]) == f"{path}:1: conversation has no assistant turn (nothing to train on)"


def test_wrong_shape_says_what_was_expected(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"text": "x"}])
    res = read_conversations(str(path))
    assert "expected a 'messages' (OpenAI) or 'conversations' (ShareGPT) field" in str(res.bad[0])


def test_empty_file(tmp_path):
    (tmp_path / "e.jsonl").write_text("")
    with pytest.raises(DataError, match=r"e\.jsonl: file is empty"):
        read_conversations(str(tmp_path / "e.jsonl"))
    (tmp_path / "blank.jsonl").write_text("\n\n")
    with pytest.raises(DataError, match=r"blank\.jsonl: no conversations found"):
        read_conversations(str(tmp_path / "blank.jsonl"))


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"data source not found: .*nope\.jsonl"):
        read_conversations(str(tmp_path / "nope.jsonl"))


def test_invalid_whole_json_names_line(tmp_path):
    (tmp_path / "d.json").write_text('[\n{"messages": []},\n{oops}\n]')
    with pytest.raises(DataError, match=r"d\.json:3: invalid JSON"):
        read_conversations(str(tmp_path / "d.json"))


def test_builtin_chitchat_alternates_roles():
    res = read_conversations("chitchat")
    assert len(res.conversations) + len(res.bad) == 7168
    assert sum("no assistant turn" in b.reason for b in res.bad) == 3150  # SPEC §6: unanswered openers
    roles = [m["role"] for m in res.conversations[0]["messages"]]
    assert roles[:4] == ["user", "assistant", "user", "assistant"]
