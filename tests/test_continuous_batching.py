"""Continuous batching for data generation equals one-prompt-at-a-time greedy decoding, for every target family.

The reference is the unrolled greedy loop of ``tests/speculate_helpers.Reference``: a full forward over the growing
sequence, no padding, no KV cache, so rows leaving and joining the batch, left padding, dropped columns and per-row
positions are all checked against something that has none of them.
"""

from __future__ import annotations

import pytest
import torch

from spec_lightning.datagen import continuous_batching as cb
from spec_lightning.datagen.continuous_batching import continuous_generate, greedy_picker, sampling_picker
from tests.families import FAMILIES
from tests.speculate_helpers import Reference

NEW = 24  # crosses the families' 16-token sliding windows together with the prompts


def _prompts(vocab: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(0)
    lengths = [3, 17, 1, 9, 30, 5, 12, 2]
    return [torch.randint(3, vocab, (n,), generator=g).tolist() for n in lengths]


def _expected(reference: list[int], eos: set[int], n: int) -> tuple[list[int], str]:
    for j, t in enumerate(reference[:n]):
        if t in eos:
            return reference[:j], "stop"
    return reference[:n], "length"


class _Recorder:
    """Wraps a model: records the input shape and the attention-mask width of every forward."""

    def __init__(self, model) -> None:
        self.model, self.shapes, self.widths = model, [], []
        self.forward = model.forward
        self.device, self.config = model.device, model.config

    def __call__(self, **kw):
        self.shapes.append(tuple(kw["input_ids"].shape))
        self.widths.append(kw["attention_mask"].shape[1])
        return self.model(**kw)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_greedy_equals_one_prompt_at_a_time(family):
    model = FAMILIES[family].build()
    prompts = _prompts(model.config.vocab_size)
    references = [Reference(model).generate(p, NEW) for p in prompts]
    # end-of-answer tokens the references do emit, so rows finish at different steps and waiting prompts join
    eos = {references[0][4], references[3][9]}
    recorder = _Recorder(model)
    got = continuous_generate(recorder, prompts, slots=3, max_new_tokens=NEW, eos_ids=eos, pad_id=0,
                              pick=greedy_picker())
    want = [_expected(r, eos, NEW) for r in references]
    assert got == want
    assert any(reason == "stop" for _, reason in got) and any(reason == "length" for _, reason in got)
    prefills = [s for s in recorder.shapes if s[1] > 1]
    assert max(s[0] for s in recorder.shapes) <= 3  # never more rows than slots
    assert len(prefills) >= 3  # prompts joined as others finished (8 prompts through 3 slots)


def test_max_new_tokens_and_single_slot(tiny_llama):
    prompts = _prompts(tiny_llama.config.vocab_size)[:4]
    got = continuous_generate(tiny_llama, prompts, slots=1, max_new_tokens=5, eos_ids={2}, pad_id=0,
                              pick=greedy_picker())
    assert got == [_expected(Reference(tiny_llama).generate(p, 5), {2}, 5) for p in prompts]


def test_tiny_nucleus_is_greedy_and_sampling_is_seeded(tiny_llama):
    prompts = _prompts(tiny_llama.config.vocab_size)
    greedy = continuous_generate(tiny_llama, prompts, slots=3, max_new_tokens=8, eos_ids={2}, pad_id=0,
                                 pick=greedy_picker())

    def sampled(top_p: float, seed: int, temperature: float = 1.0):
        return continuous_generate(tiny_llama, prompts, slots=3, max_new_tokens=8, eos_ids={2}, pad_id=0,
                                   pick=sampling_picker(temperature, top_p, seed))

    assert sampled(1e-9, 0) == greedy  # a nucleus of one token is the argmax
    assert sampled(1.0, 7) == sampled(1.0, 7)
    assert sampled(1.0, 7) != sampled(1.0, 8)
    assert sampled(1.0, 7) != greedy  # the random target's distributions are wide: sampling differs somewhere


def test_bad_arguments():
    with pytest.raises(ValueError, match="slots"):
        continuous_generate(None, [[1]], slots=0, max_new_tokens=1, eos_ids={2}, pad_id=0, pick=greedy_picker())
    with pytest.raises(ValueError, match="at least one token"):
        continuous_generate(None, [[1], []], slots=2, max_new_tokens=1, eos_ids={2}, pad_id=0, pick=greedy_picker())


def test_generator_falls_back_to_hf_generate_for_caches_it_cannot_edit(tiny_target_dir, monkeypatch):
    from spec_lightning.datagen.regenerate import GenerationSettings, Generator
    from spec_lightning.targets import load_target_model, load_tokenizer

    model, tok = load_target_model(str(tiny_target_dir)), load_tokenizer(str(tiny_target_dir))
    prompts = _prompts(model.config.vocab_size)
    gen = Generator(model, tok, GenerationSettings(max_new_tokens=6), slots=3)
    continuous = gen.generate(prompts, 0)

    def refuse(cache):
        raise cb.UnsupportedCache("a cache this scheduler cannot edit")

    monkeypatch.setattr(cb, "_check_cache", refuse)
    fallback = Generator(model, tok, GenerationSettings(max_new_tokens=6), slots=3)
    assert fallback.generate(prompts, 0) == continuous
    assert not fallback.continuous


def test_generator_samples_through_the_scheduler_reproducibly(tiny_target_dir):
    from spec_lightning.datagen.regenerate import GenerationSettings, Generator
    from spec_lightning.targets import load_target_model, load_tokenizer

    model, tok = load_target_model(str(tiny_target_dir)), load_tokenizer(str(tiny_target_dir))
    prompts = _prompts(model.config.vocab_size)
    gen = Generator(model, tok, GenerationSettings(max_new_tokens=6, temperature=0.8, top_p=0.9), slots=3)
    direct = continuous_generate(model, prompts, slots=3, max_new_tokens=6, eos_ids=gen.eos_ids, pad_id=gen.pad_id,
                                 pick=sampling_picker(0.8, 0.9, 11))
    assert gen.generate(prompts, 11) == direct == gen.generate(prompts, 11)
    assert gen.generate(prompts, 12) != direct


def test_columns_no_row_reads_are_dropped(tiny_llama, monkeypatch):
    """Many prompts through few slots: finished rows' columns are trimmed, so the cache stays about one answer wide."""
    monkeypatch.setattr(cb, "TRIM_COLUMNS", 4)
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(3, 128, (int(n),), generator=g).tolist() for n in torch.randint(1, 6, (30,), generator=g)]
    recorder = _Recorder(tiny_llama)
    got = continuous_generate(recorder, prompts, slots=2, max_new_tokens=6, eos_ids={2}, pad_id=0, pick=greedy_picker())
    assert got == [_expected(Reference(tiny_llama).generate(p, 6), {2}, 6) for p in prompts]
    decode_widths = [w for (rows, n), w in zip(recorder.shapes, recorder.widths, strict=True) if n == 1]
    assert max(decode_widths) <= 5 + 6 + 4 + 1  # longest prompt + answer + trim threshold + the new column
