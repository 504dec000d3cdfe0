"""Self-distilled data: the target answers the user turns; resumable, provenance-tagged, loads back for training."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from spec_lightning.datagen import builtins
from spec_lightning.datagen import regenerate as regen
from spec_lightning.datagen.engines.hf import HFEngine
from spec_lightning.datagen.jsonl import exclusive
from spec_lightning.datamodules import ChatDataModule
from spec_lightning.datamodules.catalog import resolve_source
from spec_lightning.datamodules.sources import read_conversations
from spec_lightning.targets import load_target_model, load_tokenizer

NEW = 5  # max_new_tokens in these tests (the tiny random target never stops on its own)


@pytest.fixture(scope="module")
def target(tiny_target_dir):
    return load_target_model(str(tiny_target_dir)), load_tokenizer(str(tiny_target_dir))


@pytest.fixture
def prompts_file(tmp_path) -> Path:
    """Ten conversations of different prompt lengths; odd ones have a second user turn, some no answer."""
    rows = []
    for i in range(10):
        messages = [{"role": "user", "content": "word " * (i % 4) + f"question {i}?"}]
        if i % 3:
            messages.append({"role": "assistant", "content": f"human answer {i}"})
        if i % 2:
            messages += [{"role": "user", "content": f"follow-up {i}"}]
        if i == 4:
            messages.insert(0, {"role": "system", "content": "Be brief."})
        rows.append({"id": f"c{i}", "messages": messages})
    path = tmp_path / "prompts.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _run(target, data, out, **kw):
    model, tok = target
    kw = {"max_new_tokens": NEW, "batch_size": 3, "progress": False, **kw}
    return regen.regenerate(str(model.name_or_path), str(data), out, model=model, tokenizer=tok, **kw)


def _records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _greedy_reference(model, tok, messages: list[dict], n: int) -> str:
    """Unrolled greedy loop: full forward over the growing sequence, no padding, no KV cache."""
    text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    ids = tok(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
    new = []
    with torch.no_grad():
        for _ in range(n):
            nxt = int(model(ids).logits[0, -1].argmax())
            if nxt == tok.eos_token_id:
                break
            new.append(nxt)
            ids = torch.cat([ids, torch.tensor([[nxt]])], dim=1)
    return tok.decode(new, skip_special_tokens=True)


def test_answers_are_the_targets_greedy_answers_turn_by_turn(target, prompts_file, tmp_path):
    model, tok = target
    out = tmp_path / "out.jsonl"
    report = _run(target, prompts_file, out, max_turns=2)
    records = _records(out)
    assert [r["id"] for r in records] == [f"c{i}" for i in range(10)]  # source order, nothing lost
    assert report.written == 10 and report.bad == 0
    source = {c["id"]: c["messages"] for c in read_conversations(str(prompts_file), require_assistant=False).conversations}
    for r in records:
        msgs = r["messages"]
        users = [m["content"] for m in source[r["id"]] if m["role"] == "user"]
        assert [m["role"] for m in msgs if m["role"] != "system"] == ["user", "assistant"] * len(users)
        assert [m["content"] for m in msgs if m["role"] == "user"] == users  # user turns kept verbatim
        assert all("human answer" not in m["content"] for m in msgs)  # human answers replaced
        # each answer equals an unrolled greedy decode of the conversation so far (incl. the target's own turns)
        for k, m in enumerate(msgs):
            if m["role"] == "assistant":
                assert m["content"] == _greedy_reference(model, tok, msgs[:k], NEW)
    assert records[4]["messages"][0] == {"role": "system", "content": "Be brief."}


def test_provenance_is_written(target, prompts_file, tmp_path):
    out = tmp_path / "out.jsonl"
    _run(target, prompts_file, out, max_turns=2, max_samples=4)
    records = _records(out)
    assert len(records) == 4
    lines = prompts_file.read_text().splitlines()
    for i, r in enumerate(records):
        p = r["provenance"]
        assert p["target"] == str(target[0].name_or_path) and len(p["target_config_sha256"]) == 16
        assert p["settings"] == {"max_new_tokens": NEW, "temperature": 0.0, "top_p": 1.0, "max_turns": 2,
                                 "max_prompt_tokens": 1024, "seed": 0, "dtype": "float32"}
        assert p["source"] == str(prompts_file) and p["source_id"] == f"c{i}" and p["source_index"] == i
        assert p["source_origin"] == f"{prompts_file}:{i + 1}" and json.loads(lines[i])["id"] == f"c{i}"
        n_turns = 2 if i % 2 else 1
        assert p["finish_reasons"] == ["length"] * n_turns  # the random target never emits <|im_end|>
        assert p["generated_tokens"] == NEW * n_turns


def test_resume_after_crash_neither_duplicates_nor_loses(target, prompts_file, tmp_path, monkeypatch):
    monkeypatch.setattr(regen, "CHUNK_BATCHES", 1)  # progress saved after every batch of 3 conversations
    clean = tmp_path / "clean.jsonl"
    _run(target, prompts_file, clean)
    out = tmp_path / "out.jsonl"
    partial = tmp_path / "out.jsonl.partial"
    real_generate = HFEngine.generate
    calls = []

    def crashing(self, prompts, sampling, seed):
        if len(calls) == 2:
            raise KeyboardInterrupt("simulated crash")
        calls.append(len(prompts))
        return real_generate(self, prompts, sampling, seed)

    monkeypatch.setattr(HFEngine, "generate", crashing)
    with pytest.raises(KeyboardInterrupt):
        _run(target, prompts_file, out)
    assert not out.exists()  # nothing final before the end
    assert len(_records(partial)) == 6  # two batches of 3, fsync'd
    with partial.open("a") as f:  # a torn write from the crash
        f.write('{"id": "c9", "messa')
    monkeypatch.setattr(HFEngine, "generate", real_generate)
    report = _run(target, prompts_file, out)
    assert report.resumed == 6 and report.generated == 4
    assert not partial.exists()
    assert _records(out) == _records(clean)  # same records, same order, as an uninterrupted run


def test_resume_refuses_a_partial_file_with_other_settings(target, prompts_file, tmp_path, monkeypatch):
    monkeypatch.setattr(regen, "CHUNK_BATCHES", 1)
    out = tmp_path / "out.jsonl"
    real_generate = HFEngine.generate
    calls = []

    def crashing(self, prompts, sampling, seed):
        if calls:
            raise KeyboardInterrupt
        calls.append(1)
        return real_generate(self, prompts, sampling, seed)

    monkeypatch.setattr(HFEngine, "generate", crashing)
    with pytest.raises(KeyboardInterrupt):
        _run(target, prompts_file, out)
    monkeypatch.setattr(HFEngine, "generate", real_generate)
    with pytest.raises(ValueError, match="other settings"):
        _run(target, prompts_file, out, max_new_tokens=NEW + 1)


def test_greedy_is_deterministic(target, prompts_file, tmp_path):
    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    _run(target, prompts_file, a, max_turns=2)
    _run(target, prompts_file, b, max_turns=2)
    assert a.read_bytes() == b.read_bytes()


def test_left_padded_batches_equal_batch_size_one(target, prompts_file, tmp_path):
    one, many = tmp_path / "one.jsonl", tmp_path / "many.jsonl"
    _run(target, prompts_file, one, batch_size=1)
    # unsorted: prompts of different lengths share a batch, so most rows are left-padded
    _run(target, prompts_file, many, batch_size=10, sort_by_length=False)
    assert _records(one) == _records(many)


def test_output_loads_back_with_assistant_loss_masks(target, tiny_target_dir, prompts_file, tmp_path):
    _, tok = target
    out = tmp_path / "out.jsonl"
    _run(target, prompts_file, out, max_turns=2)
    read = read_conversations(str(out))
    assert len(read.conversations) == 10 and not read.bad
    dm = ChatDataModule(tokenizer=str(tiny_target_dir), data=str(out), max_length=512, val_fraction=0.2)
    dm.setup("fit")
    rows = list(dm.train_dataset) + list(dm.val_dataset)
    assert len(rows) == 10
    answers = {r["id"]: [m["content"] for m in r["messages"] if m["role"] == "assistant"] for r in _records(out)}
    for row in rows:
        ids, mask = row["input_ids"], row["loss_mask"]
        # contiguous runs of trainable tokens, decoded by hand, are exactly the generated answers + <|im_end|>
        runs, current = [], []
        for t, m in zip(ids, mask):
            if m:
                current.append(t)
            elif current:
                runs.append(current)
                current = []
        if current:
            runs.append(current)
        assert [tok.decode(r) for r in runs] == [a + "<|im_end|>" for a in answers[row["id"]]]


def test_bad_source_samples_are_counted_not_fatal(target, tmp_path):
    path = tmp_path / "mixed.jsonl"
    lines = [
        json.dumps({"id": "ok1", "messages": [{"role": "user", "content": "hello"}]}),
        '{"id": "torn", "messages": [',  # malformed JSON
        json.dumps({"id": "role", "messages": [{"role": "alien", "content": "x"}]}),  # unknown role
        json.dumps({"id": "nouser", "messages": [{"role": "assistant", "content": "hi"}]}),  # nothing to answer
        json.dumps({"id": "empty", "messages": [{"role": "user", "content": "  "}]}),  # empty opener
        json.dumps({"id": "long", "messages": [{"role": "user", "content": "word " * 300}]}),  # over max_prompt_tokens
        json.dumps({"id": "ok2", "conversations": [{"from": "human", "value": "hey"}, {"from": "gpt", "value": "yo"}]}),
    ]
    path.write_text("\n".join(lines) + "\n")
    report = _run(target, path, tmp_path / "out.jsonl", max_prompt_tokens=100)
    assert report.bad == 5 and report.written == 2
    assert [r["id"] for r in _records(tmp_path / "out.jsonl")] == ["ok1", "ok2"]
    assert any("mixed.jsonl:2" in e for e in report.bad_examples)
    assert sum(report.bad_reasons.values()) == 5


def test_builtin_name_is_generated_once_and_cached(target, tiny_target_dir, tiny_chat_file, monkeypatch):
    spec = builtins.BuiltinRegenerated(target=str(tiny_target_dir), data=str(tiny_chat_file), max_samples=3,
                                    max_new_tokens=3, batch_size=2)
    monkeypatch.setitem(builtins.BUILTIN_REGENERATED, "chitchat-smollm2", spec)
    read = read_conversations(resolve_source("chitchat-smollm2"))
    assert [c["id"] for c in read.conversations] == ["s0", "s1", "s2"]
    path = builtins.builtin_regenerated_path("chitchat-smollm2")
    assert path.parent.parent.name == "data" and path.is_file()

    def fail(*a, **k):
        raise AssertionError("regenerated again")

    monkeypatch.setattr(builtins, "regenerate", fail)
    assert builtins.builtin_regenerated_path("chitchat-smollm2") == path  # cached
    monkeypatch.setenv(builtins.SAMPLES_ENV, "2")  # other settings: another cache entry
    with pytest.raises(AssertionError, match="regenerated again"):
        builtins.builtin_regenerated_path("chitchat-smollm2")
    monkeypatch.setenv(builtins.SAMPLES_ENV, "zero")
    with pytest.raises(ValueError, match=builtins.SAMPLES_ENV):
        builtins.builtin_regenerated_path("chitchat-smollm2")


def test_a_mix_of_builtin_sets_is_built_on_one_engine(tiny_target_dir, tiny_chat_file, tmp_path, monkeypatch):
    """A recipe's mix of a regenerated and a synthesized set of one target opens the engine once (a vLLM start costs
    minutes) and closes it when the mix is resolved; the regenerated set equals one written on an engine of its own."""
    from spec_lightning.datamodules.catalog import read_sources

    monkeypatch.setenv("SPEC_LIGHTNING_CACHE", str(tmp_path / "cache"))
    monkeypatch.setitem(builtins.BUILTIN_REGENERATED, "chitchat-smollm2", builtins.BuiltinRegenerated(
        target=str(tiny_target_dir), data=str(tiny_chat_file), max_samples=3, max_new_tokens=3, batch_size=2))
    monkeypatch.setitem(builtins.BUILTIN_SYNTHESIZED, "magpie-smollm2", builtins.BuiltinSynthesized(
        target=str(tiny_target_dir), num_samples=2, max_new_tokens=3, batch_size=2))
    requests = iter(f"Please tell me fact number {i} about rivers." for i in range(100))
    real_generate = HFEngine.generate

    def generate(self, prompts, sampling, seed):  # the tiny random target never ends a request: script requests
        if sampling.greedy:
            return real_generate(self, prompts, sampling, seed)
        return [(self.tokenizer(next(requests), add_special_tokens=False)["input_ids"], "stop") for _ in prompts]

    monkeypatch.setattr(HFEngine, "generate", generate)
    opened, closed = [], []
    real_open, real_close = builtins.open_engine, HFEngine.close
    monkeypatch.setattr(builtins, "open_engine", lambda *a, **k: opened.append(a) or real_open(*a, **k))
    monkeypatch.setattr(HFEngine, "close", lambda self: closed.append(self) or real_close(self))

    read = read_sources(["chitchat-smollm2", "magpie-smollm2"])
    assert len(opened) == 1 and len(closed) == 1 and builtins._shared is None
    assert len(read.conversations) == 3 + 2
    alone = tmp_path / "alone.jsonl"
    regen.regenerate(str(tiny_target_dir), str(tiny_chat_file), alone, max_samples=3, max_new_tokens=3, batch_size=2,
                     progress=False)
    assert [r["messages"] for r in _records(alone)] == [c["messages"] for c in read.conversations[:3]]
    read_sources(["chitchat-smollm2", "magpie-smollm2"])  # cached: no engine opened
    assert len(opened) == 1


def test_cli_regenerate_subcommand(tiny_target_dir, tiny_chat_file, tmp_path):
    from cli import main

    out = tmp_path / "cli.jsonl"
    report = main(args=["regenerate", "--target", str(tiny_target_dir), "--data", str(tiny_chat_file),
                        "--out", str(out), "--max_samples", "2", "--max_new_tokens", "2", "--progress", "false"])
    assert report.written == 2 and len(_records(out)) == 2


def test_bad_settings_are_refused(target, prompts_file, tmp_path):
    with pytest.raises(ValueError, match="top_p"):
        _run(target, prompts_file, tmp_path / "o.jsonl", top_p=0.0)
    with pytest.raises(ValueError, match=r"\.jsonl"):
        _run(target, prompts_file, tmp_path / "o.json")


def test_a_second_writer_of_the_same_output_is_refused(target, prompts_file, tmp_path):
    out = tmp_path / "out.jsonl"
    # another process is mid-run (flock conflicts across open file descriptions, even in one process)
    with exclusive(tmp_path / "out.jsonl.lock", wait=False), pytest.raises(ValueError, match="another"):
        _run(target, prompts_file, out)
    _run(target, prompts_file, out, max_samples=2)  # free again
    assert len(_records(out)) == 2


@pytest.mark.slow
def test_builtin_target_answers_in_batches_as_alone(tmp_path):
    """SmolLM2 (real weights): left-padded batch answers equal one-at-a-time answers, and they end on their own."""
    data = tmp_path / "p.jsonl"
    prompts = ["Hi!", "What is the capital of France?", "Name a colour.", "hello how are you doing today my friend"]
    data.write_text("".join(json.dumps({"id": f"p{i}", "messages": [{"role": "user", "content": p}]}) + "\n"
                            for i, p in enumerate(prompts)))
    target = load_target_model("smollm2-135m-instruct"), load_tokenizer("smollm2-135m-instruct")
    one, many = tmp_path / "one.jsonl", tmp_path / "many.jsonl"
    _run(target, data, one, batch_size=1, max_new_tokens=24)
    _run(target, data, many, batch_size=4, max_new_tokens=24, sort_by_length=False)
    records = _records(one)
    assert [r["messages"] for r in records] == [r["messages"] for r in _records(many)]
    assert "Paris" in records[1]["messages"][-1]["content"]
    assert "stop" in [x for r in records for x in r["provenance"]["finish_reasons"]]
