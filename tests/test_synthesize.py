"""Magpie-style self-synthesis: the template's user-turn opening, de-duplication, exclusion of held-out prompts,
multi-turn follow-ups, resume after a crash, provenance and the diversity report (scripted generations)."""

from __future__ import annotations

import json

import pytest

from spec_lightning.datagen import synthesize as synth
from spec_lightning.datagen.builtins import HELDOUT
from spec_lightning.datagen.engines.hf import HFEngine
from spec_lightning.datagen.synthesize import diversity, synthesize, user_turn_prefix
from spec_lightning.datamodules.catalog import read_sources, resolve_source
from spec_lightning.targets import load_target_model, load_tokenizer


@pytest.fixture(scope="module")
def target(tiny_target_dir):
    return load_target_model(str(tiny_target_dir)), load_tokenizer(str(tiny_target_dir))


class Script:
    """Stands in for HF generation: user turns come from ``queries`` in order, answers echo the request."""

    def __init__(self, tokenizer, queries: list[str]) -> None:
        self.tokenizer, self.queries, self.calls = tokenizer, list(queries), 0

    def __call__(self, sampling, prompts, seed):
        self.calls += 1
        out = []
        for p in prompts:
            if sampling.greedy:  # an answer
                question = self.tokenizer.decode(p[-12:])
                out.append((self.tokenizer(f"Answer {len(p)} {question[-5:]}", add_special_tokens=False)["input_ids"],
                            "stop"))
            else:
                text = self.queries.pop(0) if self.queries else "ran out"
                reason = "length" if text.startswith("CUT") else "stop"
                out.append((self.tokenizer(text, add_special_tokens=False)["input_ids"], reason))
        return out


def test_user_turn_prefix_is_the_templates_opening_of_a_user_turn():
    tok = load_tokenizer("smollm2-135m-instruct")
    prefix = user_turn_prefix(tok, [])
    assert prefix.endswith("<|im_start|>user\n") and "<|im_start|>system" in prefix  # ChatML, default system prompt
    later = user_turn_prefix(tok, [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}])
    assert later.endswith("Hello!<|im_end|>\n<|im_start|>user\n")


def test_dedupe_exclude_filters_and_provenance(target, tmp_path, monkeypatch):
    model, tok = target
    heldout = json.loads(HELDOUT["heldout-instructions"].read_text().splitlines()[0])["messages"][0]["content"]
    monkeypatch.setattr(synth, "ROUND_BATCHES", 1)  # one batch of 4 requests per round
    script = Script(tok, ["Explain how tides work please, for a child.", "explain   HOW tides work please, for a child.", "short",
                          "CUT a request that never ended", heldout, "Write a poem about rain in spring.",
                          "Explain how tides work, please: for adults", "List three uses of copper wire."])
    monkeypatch.setattr(HFEngine, "generate", lambda self, prompts, sampling, seed: script(sampling, prompts, seed))
    report = synthesize(str(tmp_path / "model"), tmp_path / "m.jsonl", num_samples=3, batch_size=4, model=model,
                        tokenizer=tok, exclude=[resolve_source("heldout-instructions")], progress=False)
    records = [json.loads(line) for line in (tmp_path / "m.jsonl").read_text().splitlines()]
    firsts = [r["messages"][0]["content"] for r in records]
    assert firsts == ["Explain how tides work please, for a child.", "Write a poem about rain in spring.",
                      "List three uses of copper wire."]
    # case/space duplicate, same first words, too short, cut, held-out: each dropped and counted
    assert report.dropped == {"duplicate": 3, "too short": 1, "did not end": 1}
    assert report.queries_sampled == 8 and report.batches == 2 and not script.queries
    assert all(r["messages"][1]["role"] == "assistant" for r in records)
    prov = records[0]["provenance"]
    assert prov["synthesized"] and prov["settings"]["query_temperature"] == 1.0 and prov["finish_reasons"] == ["stop"]
    assert "request_openers" not in prov["settings"]  # plain Magpie: recorded exactly as before openers existed
    assert report.diversity["user_turns"]["count"] == 3 and (tmp_path / "m.report.json").is_file()
    assert len(read_sources(str(tmp_path / "m.jsonl")).conversations) == 3


def test_multi_turn_follow_ups_are_written_by_the_target(target, tmp_path, monkeypatch):
    model, tok = target
    script = Script(tok, ["How do plants grow in winter?", "And what about cacti then?"])
    monkeypatch.setattr(HFEngine, "generate", lambda self, prompts, sampling, seed: script(sampling, prompts, seed))
    synthesize(str(tmp_path / "model"), tmp_path / "m.jsonl", num_samples=1, max_turns=2, batch_size=1, model=model,
               tokenizer=tok, progress=False)
    (record,) = [json.loads(line) for line in (tmp_path / "m.jsonl").read_text().splitlines()]
    assert [m["role"] for m in record["messages"]] == ["user", "assistant", "user", "assistant"]
    assert record["messages"][2]["content"] == "And what about cacti then?"


def test_resume_continues_after_the_last_finished_batch(target, tmp_path, monkeypatch):
    model, tok = target
    monkeypatch.setattr(synth, "ROUND_BATCHES", 1)  # rounds of batch_size = 2 requests
    queries = [f"Question number {i} about rivers and lakes?" for i in range(8)]
    script = Script(tok, queries)
    monkeypatch.setattr(HFEngine, "generate", lambda self, prompts, sampling, seed: script(sampling, prompts, seed))
    kwargs = {"num_samples": 4, "batch_size": 2, "model": model, "tokenizer": tok, "progress": False}
    synthesize(str(tmp_path / "model"), tmp_path / "m.jsonl", max_batches=1, **kwargs)  # "crashes" after a batch
    (tmp_path / "m.jsonl").replace(tmp_path / "m.jsonl.partial")  # as an interrupted run leaves it
    report = synthesize(str(tmp_path / "model"), tmp_path / "m.jsonl", **kwargs)
    records = [json.loads(line) for line in (tmp_path / "m.jsonl").read_text().splitlines()]
    assert report.resumed == 2 and [r["provenance"]["batch"] for r in records] == [0, 0, 1, 1]
    assert len({r["messages"][0]["content"] for r in records}) == 4


class SeededScript:
    """Sampled user turns are a function of the generation seed and the row (as real sampling is of the seed and the
    batch); answers of the prompt. Some requests never end, some repeat, some are too short."""

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer

    def __call__(self, sampling, prompts, seed):
        out = []
        for row, p in enumerate(prompts):
            if sampling.greedy:
                text, reason = f"Answer {len(p)} {sum(p) % 9973}", "stop"
            else:
                n = (seed * 31 + row * 7) % 23
                text = "tiny" if n == 5 else f"Tell me about topic {n % 17} and more?"
                reason = "length" if n == 3 else "stop"
            out.append((self.tokenizer(text, add_special_tokens=False)["input_ids"], reason))
        return out


def test_round_size_does_not_change_the_conversations(target, tmp_path, monkeypatch):
    """Requests are seeded per batch and answers are greedy: one batch per round and eight give the same file."""
    model, tok = target
    script = SeededScript(tok)
    monkeypatch.setattr(HFEngine, "generate", lambda self, prompts, sampling, seed: script(sampling, prompts, seed))
    files = {}
    for rounds in (1, 8):
        monkeypatch.setattr(synth, "ROUND_BATCHES", rounds)
        files[rounds] = tmp_path / f"m{rounds}.jsonl"
        report = synthesize(str(tmp_path / "model"), files[rounds], num_samples=12, max_turns=2, batch_size=3,
                            model=model, tokenizer=tok, progress=False)
        assert report.samples == 12 and report.dropped["duplicate"] > 0 and report.dropped["did not end"] > 0
    assert files[1].read_bytes() == files[8].read_bytes()
    records = [json.loads(line) for line in files[8].read_text().splitlines()]
    assert any(len(r["messages"]) == 4 for r in records)  # follow-ups written and answered


def test_diversity_by_hand():
    d = diversity(["a b a", "a c"])
    assert d["distinct_1"] == pytest.approx(3 / 5)  # unigrams: a b a a c -> {a, b, c}
    assert d["distinct_2"] == pytest.approx(3 / 3)  # (a b) (b a) (a c)
    assert d["top_first_words"] == {"a": 2} and d["length_histogram"]["0-8"] == 2


def test_builtin_synthesized_cache_is_keyed_by_heldout_content_not_location(tmp_path, monkeypatch):
    """A checkout or install elsewhere finds the same one-time build; editing a held-out set makes a new one."""
    import shutil

    from spec_lightning.datagen import builtins

    monkeypatch.setenv("SPEC_LIGHTNING_CACHE", str(tmp_path / "cache"))
    here = builtins.synthesized_cache_path("magpie-smollm2")
    moved = {}
    for name, path in HELDOUT.items():
        moved[name] = tmp_path / "elsewhere" / path.name
        moved[name].parent.mkdir(exist_ok=True)
        shutil.copy(path, moved[name])
    monkeypatch.setattr(builtins, "HELDOUT", moved)
    assert builtins.synthesized_cache_path("magpie-smollm2") == here
    with open(moved["heldout-instructions"], "a") as f:
        f.write(json.dumps({"messages": [{"role": "user", "content": "one more held-out request"}]}) + "\n")
    assert builtins.synthesized_cache_path("magpie-smollm2") != here


class OpenerScript:
    """Records the sampled prompts; each request's continuation is " about topic <n>?" (n counts requests)."""

    def __init__(self, tokenizer) -> None:
        self.tokenizer, self.prompts = tokenizer, []

    def __call__(self, sampling, prompts, seed):
        if sampling.greedy:
            return [(self.tokenizer("Sure.", add_special_tokens=False)["input_ids"], "stop") for _ in prompts]
        out = []
        for p in prompts:
            self.prompts.append(self.tokenizer.decode(p))
            out.append((self.tokenizer(f" about topic {len(self.prompts)}?", add_special_tokens=False)["input_ids"],
                        "stop"))
        return out


def test_request_openers_are_written_into_the_prompt_and_begin_the_request(target, tmp_path, monkeypatch):
    model, tok = target
    script = OpenerScript(tok)
    monkeypatch.setattr(HFEngine, "generate", lambda self, prompts, sampling, seed: script(sampling, prompts, seed))
    monkeypatch.setattr(synth, "ROUND_BATCHES", 1)
    openers = ["Explain", "", "Write a Python function"]
    kwargs = {"num_samples": 5, "batch_size": 2, "model": model, "tokenizer": tok, "progress": False,
              "request_openers": openers}
    synthesize(str(tmp_path / "model"), tmp_path / "m.jsonl", max_batches=1, **kwargs)  # "crashes" after a batch
    (tmp_path / "m.jsonl").replace(tmp_path / "m.jsonl.partial")
    report = synthesize(str(tmp_path / "model"), tmp_path / "m.jsonl", **kwargs)  # resumes: same settings
    assert report.resumed == 2 and report.samples == 5
    # request i (batches of 2, in order) opens with openers[i % 3]; the prompt ends with the user-turn opening + it
    expected = ["Explain", "", "Write a Python function", "Explain", "", "Write a Python function"]
    opening_text = user_turn_prefix(tok, [])
    assert [p[p.rindex(opening_text) + len(opening_text):] for p in script.prompts] == expected
    records = [json.loads(line) for line in (tmp_path / "m.jsonl").read_text().splitlines()]
    firsts = [r["messages"][0]["content"] for r in records]
    assert firsts == ["Explain about topic 1?", "about topic 2?", "Write a Python function about topic 3?",
                      "Explain about topic 4?", "about topic 5?"]
    assert records[0]["provenance"]["settings"]["request_openers"] == openers
    with pytest.raises(ValueError, match="request_openers"):
        synthesize(str(tmp_path / "model"), tmp_path / "n.jsonl", **{**kwargs, "request_openers": ["Explain "]})


def test_builtin_task_set_has_its_own_cache_key_and_the_plain_key_is_unchanged(tmp_path, monkeypatch):
    """Adding openers must not move the cache of a plain Magpie set built before they existed."""
    import hashlib

    from spec_lightning.datagen import builtins
    from spec_lightning.integrity import sha256_file

    monkeypatch.setenv("SPEC_LIGHTNING_CACHE", str(tmp_path / "cache"))
    before = {"num_samples": 512, "max_turns": 1, "query_temperature": 1.0, "query_top_p": 0.95,
              "max_query_tokens": 64, "min_query_chars": 12, "max_new_tokens": 128, "seed": 0, "dtype": "float32"}
    key = json.dumps({"v": synth.SYNTHESIS_VERSION, "target": "smollm2-135m-instruct", "settings": before,
                      "exclude": {h: sha256_file(p) for h, p in HELDOUT.items()}}, sort_keys=True)
    plain = builtins.synthesized_cache_path("magpie-smollm2")
    assert plain.name == f"magpie-smollm2-512-{hashlib.sha256(key.encode()).hexdigest()[:16]}.jsonl"
    tasks = builtins.synthesized_cache_path("magpie-tasks-smollm2")
    assert tasks.name.startswith("magpie-tasks-smollm2-512-") and tasks.parent == plain.parent
    assert builtins.BUILTIN_SYNTHESIZED["magpie-tasks-smollm2"].request_openers.count("") >= 1
