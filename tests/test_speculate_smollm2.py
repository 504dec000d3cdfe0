"""Losslessness on the embedded SmolLM2-135M-Instruct target (slow: real model, reference loop without cache)."""

from __future__ import annotations

import pytest

from spec_lightning.datamodules.prompts import prompt_from_messages
from spec_lightning.drafts.medusa import MedusaConfig, MedusaHeads
from spec_lightning.speculate.decode import speculative_generate
from spec_lightning.speculate.eagle3 import Eagle3Drafter
from spec_lightning.speculate.evaluate import eos_token_ids
from spec_lightning.speculate.medusa import MedusaDrafter
from spec_lightning.targets import FrozenTarget, load_target_model, load_tokenizer
from tests.speculate_helpers import OracleEagle3, OracleMedusa, Reference, random_eagle3

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]

MAX_NEW = 12
QUESTIONS = ["What would you do if you had a million dollars?", "Name three colours."]


@pytest.fixture(scope="module")
def setup():
    model = load_target_model("smollm2-135m-instruct")
    tok = load_tokenizer("smollm2-135m-instruct")
    prompts = [prompt_from_messages(tok, [{"role": "user", "content": q}]) for q in QUESTIONS]
    return model, tok, prompts, Reference(model)


def test_greedy_speculative_output_equals_smollm2_greedy(setup):
    model, tok, prompts, reference = setup
    eos = eos_token_ids(model, tok)
    heads = MedusaHeads(MedusaConfig(hidden_size=576, vocab_size=model.config.vocab_size, num_heads=3))
    heads.init_from_lm_head(model.lm_head.weight)
    eagle = random_eagle3(model, draft_vocab_size=2048)
    eagle_full = random_eagle3(model, draft_vocab_size=model.config.vocab_size, shuffle_vocab=False, seed=1)
    drafters = {
        "medusa-fresh": MedusaDrafter(heads),
        "medusa-oracle": OracleMedusa(heads, reference, ranks=[0, 1, 0]),
        "eagle3-random": Eagle3Drafter(eagle, tree_topk=3, tree_depth=3, tree_total_tokens=8),
        "eagle3-oracle": OracleEagle3(eagle_full, reference, deep_rank=1, tree_topk=2, tree_depth=3,
                                      tree_total_tokens=6),
    }
    for i, prompt in enumerate(prompts):
        want = reference.generate(prompt, MAX_NEW, eos)
        for name, drafter in drafters.items():
            runner = FrozenTarget(model)
            oracle = "oracle" in name
            if oracle and i > 0:  # oracles run the uncached reference for every tree node: one prompt is enough
                continue
            for mode in ("chain", "tree"):
                got = speculative_generate(runner, drafter, prompt, MAX_NEW, eos, mode=mode, num_draft_tokens=3)
                assert got.tokens == want, f"{name}/{mode}: {tok.decode(got.tokens)!r} != {tok.decode(want)!r}"
                if oracle and mode == "tree":
                    assert got.accept_length > 2.0
