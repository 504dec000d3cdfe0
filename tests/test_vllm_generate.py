"""regenerate and synthesize on vLLM (one in-process engine for the module): greedy answers agree with the HF engine,
records carry the engine, sampled requests are reproducible, and a killed run resumes without duplicates."""

from __future__ import annotations

import json

import pytest

from tests.vllm_helpers import needs_vllm, vllm_environment

pytestmark = [pytest.mark.vllm, needs_vllm]
TARGET = "smollm2-135m-instruct"
NEW = 32


@pytest.fixture(scope="module")
def vllm_engine():
    vllm_environment()
    from spec_lightning.datagen.engines import VllmOptions, open_engine

    engine = open_engine(TARGET, "float32", engine="vllm", vllm=VllmOptions(max_num_seqs=16), batch_size=16)
    yield engine
    engine.close()


@pytest.fixture(scope="module")
def openers(tmp_path_factory):
    from spec_lightning.datamodules.sources import read_conversations

    rows = [c for c in read_conversations("chitchat", require_assistant=False).conversations][:16]
    path = tmp_path_factory.mktemp("openers") / "openers.jsonl"
    path.write_text("".join(json.dumps({"id": c["id"], "messages": c["messages"][:1]}) + "\n" for c in rows))
    return path


def _records(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_greedy_answers_agree_with_the_hf_engine(vllm_engine, openers, tmp_path):
    from spec_lightning.datagen.regenerate import regenerate

    kw = {"max_new_tokens": NEW, "batch_size": 16, "progress": False}
    regenerate(TARGET, str(openers), tmp_path / "vllm.jsonl", runner=vllm_engine, **kw)
    regenerate(TARGET, str(openers), tmp_path / "hf.jsonl", engine="hf", **kw)
    ours, theirs = _records(tmp_path / "vllm.jsonl"), _records(tmp_path / "hf.jsonl")
    assert [r["id"] for r in ours] == [r["id"] for r in theirs]
    same = sum(a["messages"] == b["messages"] for a, b in zip(ours, theirs, strict=True))
    assert same >= 14, f"only {same} of 16 greedy answers identical"  # fp32 summation order may flip a near-tie
    assert {r["provenance"]["engine"] for r in ours} == {"vllm"} and {r["provenance"]["engine"] for r in theirs} == {"hf"}
    assert ours[0]["provenance"]["engine_version"] == vllm_engine.version


def test_killed_run_resumes_without_duplicates(vllm_engine, openers, tmp_path, monkeypatch):
    from spec_lightning.datagen import regenerate as regen

    kw = {"max_new_tokens": NEW, "batch_size": 4, "progress": False, "runner": vllm_engine}
    monkeypatch.setattr(regen, "CHUNK_BATCHES", 1)
    clean = regen.regenerate(TARGET, str(openers), tmp_path / "clean.jsonl", **kw)
    assert clean.written == 15  # of the 16 openers, one is longer than max_prompt_tokens and skipped
    real, calls = type(vllm_engine).generate, []

    def killed(self, prompts, sampling, seed):
        if len(calls) == 2:
            raise KeyboardInterrupt("killed")
        calls.append(len(prompts))
        return real(self, prompts, sampling, seed)

    monkeypatch.setattr(type(vllm_engine), "generate", killed)
    with pytest.raises(KeyboardInterrupt):
        regen.regenerate(TARGET, str(openers), tmp_path / "out.jsonl", **kw)
    monkeypatch.setattr(type(vllm_engine), "generate", real)
    report = regen.regenerate(TARGET, str(openers), tmp_path / "out.jsonl", **kw)
    assert report.resumed == 8 and report.generated == 7  # two batches of 4 were written before the kill
    assert _records(tmp_path / "out.jsonl") == _records(tmp_path / "clean.jsonl")


def test_synthesized_requests_are_reproducible(vllm_engine, tmp_path):
    from spec_lightning.datagen.synthesize import synthesize

    kw = {"num_samples": 6, "batch_size": 4, "max_new_tokens": NEW, "progress": False, "runner": vllm_engine}
    synthesize(TARGET, tmp_path / "a.jsonl", **kw)
    synthesize(TARGET, tmp_path / "b.jsonl", **kw)
    a = _records(tmp_path / "a.jsonl")
    assert len(a) == 6 and a == _records(tmp_path / "b.jsonl")
    assert all(r["messages"][0]["role"] == "user" and r["messages"][1]["role"] == "assistant" for r in a)
    assert len({r["messages"][0]["content"] for r in a}) == 6
